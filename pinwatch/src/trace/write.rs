//! Writing a trace: the file made safely (owner-only, never through a link, never over
//! an existing file unless asked), compressed with zstd when its name ends in `.zst`,
//! and flushed by the caller at each tick and after each hazard, so that a crash loses
//! at most the last second.

use std::{
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use super::Event;

/// Less free space than this on the trace's filesystem is refused at start.
const MIN_FREE_BYTES: u64 = 1 << 20;

/// A trace file made for writing, checked before anything is attached.
pub struct NewFile {
    file: File,
    path: PathBuf,
}

pub fn create(path: &Path, force: bool) -> Result<NewFile> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("cannot write {shown}: the directory {} does not exist", dir.display());
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            bail!("{shown} is a symbolic link: pinwatch does not write traces through links");
        }
        if !force {
            bail!("{shown} exists: pass --force to replace it, or choose another name");
        }
        if !meta.is_file() {
            bail!("{shown} exists and is not a regular file");
        }
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let file = open.open(path).with_context(|| format!("creating {shown}"))?;
    let new = NewFile { file, path: path.to_path_buf() };
    // A replaced file keeps its old mode: make it the owner's alone.
    new.file.set_permissions(std::fs::Permissions::from_mode(0o600)).with_context(|| format!("making {shown} owner-only"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs fills `st` for an open fd.
    if unsafe { libc::fstatvfs(std::os::fd::AsRawFd::as_raw_fd(&new.file), &mut st) } == 0 {
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if free < MIN_FREE_BYTES {
            new.discard();
            bail!("no space to write {shown}: {free} bytes free on its filesystem");
        }
    }
    Ok(new)
}

impl NewFile {
    /// The writer for this file: zstd-compressed when the name ends in `.zst`.
    pub fn writer(self) -> Result<Writer> {
        let buffered = BufWriter::new(self.file);
        let out = if self.path.extension().is_some_and(|e| e == "zst") {
            Out::Zstd(zstd::Encoder::new(buffered, 3).context("starting zstd")?)
        } else {
            Out::Plain(buffered)
        };
        Ok(Writer { out: Some(out), path: self.path })
    }

    /// The file itself, for output other than a trace (an export).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Removes the file: the run that was to fill it never started.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum Out {
    Plain(BufWriter<File>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
}

/// One event per line. Errors name the file (a full disk says where).
pub struct Writer {
    out: Option<Out>,
    path: PathBuf,
}

impl Writer {
    fn out(&mut self) -> &mut dyn Write {
        match self.out.as_mut().expect("a finished writer is not written to") {
            Out::Plain(w) => w,
            Out::Zstd(w) => w,
        }
    }

    pub fn write(&mut self, event: &Event) -> Result<()> {
        let path = self.path.display().to_string();
        let out = self.out();
        serde_json::to_writer(&mut *out, event).with_context(|| format!("writing {path}"))?;
        out.write_all(b"\n").with_context(|| format!("writing {path}"))?;
        Ok(())
    }

    /// Everything written so far reaches the file (a zstd block is closed for it).
    pub fn flush(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        self.out().flush().with_context(|| format!("writing {path}"))
    }

    /// Ends the trace: the zstd frame is closed, the file flushed.
    pub fn finish(mut self) -> Result<()> {
        let shown = self.path.display().to_string();
        match self.out.take() {
            Some(Out::Plain(mut w)) => w.flush(),
            Some(Out::Zstd(z)) => z.finish().and_then(|mut w| w.flush()),
            None => Ok(()),
        }
        .with_context(|| format!("writing {shown}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_files_are_private_and_never_clobbered() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("pinwatch-create-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        create(&path, false).unwrap().writer().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = create(&path, false).err().expect("an existing file is refused").to_string();
        assert!(err.contains("--force"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        create(&path, true).unwrap().writer().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "a replaced file is made owner-only");
        let link = dir.join("link.jsonl");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        for force in [false, true] {
            let err = create(&link, force).err().expect("a link is refused").to_string();
            assert!(err.contains("symbolic link"), "{err}");
        }
        let err = create(&dir.join("missing/t.jsonl"), false).err().expect("a missing directory is refused").to_string();
        assert!(err.contains("missing") && err.contains("does not exist"), "{err}");
        let new = create(&dir.join("gone.jsonl"), false).unwrap();
        new.discard();
        assert!(!dir.join("gone.jsonl").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

}

//! Small helpers for running commands with errors that say what failed.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

/// Runs a command with its output kept back, shown only when it fails: set-up is quiet
/// unless something goes wrong.
pub fn quiet(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {desc}"))?;
    if !out.status.success() {
        bail!("{desc} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program} >/dev/null")]).status().map(|s| s.success()).unwrap_or(false)
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where downloaded kernels and built images are kept between runs.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PINWATCH_LAB_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/pinwatch/lab")
}

/// Compares Debian-ish version strings by their runs of digits, then text.
pub fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                out.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        out.push((0, text));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["linux-image-6.12.99+deb13", "linux-image-6.12.117+deb13", "linux-image-6.12.107+deb13"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v.last().unwrap(), &"linux-image-6.12.117+deb13");
    }
}

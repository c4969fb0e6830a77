//! `cargo xtask package`: the Debian package, built with cargo-deb (its metadata is in
//! pinwatch/Cargo.toml), after the pieces cargo-deb cannot make: man pages and shell
//! completions, written by pinwatch itself (clap_mangen, clap_complete). `check` unpacks
//! a package and tries each piece as its user would.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{output, quiet, workspace_root};

/// Builds the package; returns its path.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    quiet(Command::new("cargo").args(["build", "--release", "-p", "pinwatch"]).current_dir(&root))?;
    let pw = root.join("target/release/pinwatch");
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("completions"))?;
    quiet(Command::new(&pw).arg("man").arg(out.join("man")))?;
    for (shell, file) in [("bash", "pinwatch.bash"), ("zsh", "_pinwatch"), ("fish", "pinwatch.fish")] {
        let script = output(Command::new(&pw).args(["completions", shell]))?;
        std::fs::write(out.join("completions").join(file), script)?;
    }
    let said = output(Command::new("cargo").args(["deb", "-p", "pinwatch", "--no-build", "--output"]).arg(&out).current_dir(&root))
        .context("cargo deb (`cargo xtask setup` installs cargo-deb)")?;
    let deb = said.lines().rev().map(str::trim).find(|l| l.ends_with(".deb")).map(PathBuf::from);
    let deb = match deb {
        Some(d) => d,
        None => std::fs::read_dir(&out)?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "deb")).context("cargo deb made no .deb")?,
    };
    Ok(deb)
}

/// Unpacks the package and checks each piece: the binary runs, the default configuration
/// is valid, the unit verifies, the rules load, the man pages render, the completions
/// know the commands, the configuration is a conffile.
pub fn check(deb: &Path) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("pinwatch-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let r = check_in(deb, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn check_in(deb: &Path, dir: &Path) -> Result<String> {
    quiet(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    let control = dir.join("DEBIAN");
    quiet(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control))?;
    let fields = output(Command::new("dpkg-deb").arg("-f").arg(deb))?;
    ensure!(fields.contains("Package: pinwatch") && fields.contains("Architecture: amd64"), "control fields:\n{fields}");
    let pw = dir.join("usr/bin/pinwatch");
    let v = output(Command::new(&pw).arg("--version")).context("the packaged binary")?;
    ensure!(v.starts_with("pinwatch "), "pinwatch --version said {v:?}");
    let conf = dir.join("etc/pinwatch/pinwatch.toml");
    let c = output(Command::new(&pw).args(["alert", "--check-config"]).arg(&conf)).context("the packaged configuration")?;
    ensure!(c.contains("valid"), "--check-config said {c:?}");
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    ensure!(conffiles.lines().any(|l| l == "/etc/pinwatch/pinwatch.toml"), "the configuration is not a conffile: {conffiles:?}");
    let unit = ["lib/systemd/system/pinwatch.service", "usr/lib/systemd/system/pinwatch.service"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.exists())
        .context("no pinwatch.service in the package")?;
    let text = std::fs::read_to_string(&unit)?;
    let here = dir.join("pinwatch.service");
    std::fs::write(&here, text.replace("/usr/bin/pinwatch", &pw.display().to_string()))?;
    let o = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&here).output()?;
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.success() && said.trim().is_empty(), "the packaged unit: {said}");
    let rules = dir.join("usr/share/pinwatch/prometheus/pinwatch.rules.yml");
    quiet(Command::new("promtool").args(["check", "rules"]).arg(&rules))?;
    let man = dir.join("usr/share/man/man1");
    let mut pages = 0;
    for e in std::fs::read_dir(&man).context("no man pages")?.flatten() {
        let p = e.path();
        let rendered = Command::new("man").arg("-l").arg(&p).env("MANPAGER", "cat").env("MANWIDTH", "100").output();
        match rendered {
            // man is not on every build machine: then the page's roff header is checked.
            Err(_) => {
                let raw = read_maybe_gz(&p)?;
                ensure!(raw.contains(".TH pinwatch"), "{} is not a man page", p.display());
            }
            Ok(o) => ensure!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("pinwatch"), "man -l {} failed", p.display()),
        }
        pages += 1;
    }
    ensure!(pages >= 7, "{pages} man pages, wanted pinwatch.1 and one per command");
    ensure!(read_maybe_gz(&man.join("pinwatch-alert.1")).or_else(|_| read_maybe_gz(&man.join("pinwatch-alert.1.gz")))?.contains("check\\-config"), "pinwatch-alert.1 does not document --check-config");
    for (file, sub) in [
        ("usr/share/bash-completion/completions/pinwatch", "alert"),
        ("usr/share/zsh/vendor-completions/_pinwatch", "alert"),
        ("usr/share/fish/vendor_completions.d/pinwatch.fish", "alert"),
    ] {
        let t = std::fs::read_to_string(dir.join(file)).with_context(|| format!("no {file}"))?;
        ensure!(t.contains(sub) && t.contains("check-config"), "{file} does not complete `pinwatch {sub} --check-config`");
    }
    let bash = Command::new("bash").arg("-n").arg(dir.join("usr/share/bash-completion/completions/pinwatch")).status()?;
    ensure!(bash.success(), "the bash completion script does not parse");
    Ok(format!(
        "{}: binary runs, default configuration valid and a conffile, unit verifies, rules load, {pages} man pages render, completions for bash (parses), zsh, fish",
        deb.file_name().unwrap_or_default().to_string_lossy()
    ))
}

fn read_maybe_gz(p: &Path) -> Result<String> {
    if p.extension().is_some_and(|e| e == "gz") {
        let o = Command::new("gzip").arg("-dc").arg(p).output()?;
        if !o.status.success() {
            bail!("gzip -dc {}", p.display());
        }
        return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    Ok(std::fs::read_to_string(p)?)
}

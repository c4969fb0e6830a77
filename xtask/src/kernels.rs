//! Debian kernels for the lab: names resolved with apt-cache against a private apt
//! configuration (the system's own sources are left alone), packages downloaded once
//! and unpacked into the cache.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::util::{cache_dir, output, quiet, run, version_key};

#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub name: &'static str,
    pub suite: &'static str,
    /// Package name prefix and suffix; the highest version between them wins.
    prefix: &'static str,
    suffix: &'static str,
    /// Whether the archive may have dropped this suite (then the lab says so plainly).
    may_be_retired: bool,
}

pub const SERIES: &[Series] = &[
    Series { name: "5.10", suite: "bullseye", prefix: "linux-image-5.10.0-", suffix: "-cloud-amd64-unsigned", may_be_retired: true },
    Series { name: "6.1", suite: "bookworm", prefix: "linux-image-6.1.0-", suffix: "-cloud-amd64-unsigned", may_be_retired: false },
    Series { name: "6.12", suite: "trixie", prefix: "linux-image-6.12.", suffix: "-cloud-amd64-unsigned", may_be_retired: false },
    // "7.2 or newer": any 7.x (or later) cloud build in sid.
    Series { name: "7.x", suite: "sid", prefix: "linux-binary-unsigned-", suffix: "-cloud-amd64", may_be_retired: false },
];

pub struct Kernel {
    /// uname -r of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub enum Fetched {
    Ready(Kernel),
    /// The archive no longer serves this series.
    Retired(String),
}

fn apt_dir() -> PathBuf {
    cache_dir().join("apt")
}

/// The Debian mirror this machine's apt already uses: read from its sources so that
/// the lab goes wherever the system is allowed to go.
fn mirror() -> Result<String> {
    let mut texts = Vec::new();
    for f in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        if let Ok(t) = fs::read_to_string(f) {
            texts.push(t);
        }
    }
    for t in &texts {
        for line in t.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("URIs:") {
                if let Some(uri) = rest.split_whitespace().find(|u| u.trim_end_matches('/').ends_with("/debian")) {
                    return Ok(uri.trim_end_matches('/').to_string());
                }
            }
            if l.starts_with("deb ") {
                if let Some(uri) = l.split_whitespace().find(|w| w.contains("://") && w.trim_end_matches('/').ends_with("/debian")) {
                    return Ok(uri.trim_end_matches('/').to_string());
                }
            }
        }
    }
    bail!("no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list: the lab fetches kernels through the system's own Debian mirror")
}

fn apt_config() -> Result<PathBuf> {
    let dir = apt_dir();
    for d in ["lists/partial", "cache/archives/partial", "etc"] {
        fs::create_dir_all(dir.join(d))?;
    }
    let uri = mirror()?;
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let sources: String = SERIES.iter().map(|s| format!("deb [signed-by={keyring}] {uri} {} main\n", s.suite)).collect();
    fs::write(dir.join("etc/sources.list"), sources)?;
    let conf = dir.join("apt.conf");
    fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"{d}/etc/sources.list\";\nDir::Etc::SourceParts \"/dev/null\";\nDir::State::Lists \"{d}/lists\";\nDir::Cache \"{d}/cache\";\nDir::State::status \"/dev/null\";\nAcquire::Languages \"none\";\nAPT::Architecture \"amd64\";\n",
            d = dir.display()
        ),
    )?;
    Ok(conf)
}

fn apt(conf: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.env("APT_CONFIG", conf).args(["-o", "APT::Sandbox::User=root"]);
    c
}

/// Updates the private package lists (at most once an hour).
pub fn update() -> Result<PathBuf> {
    let conf = apt_config()?;
    let stamp = apt_dir().join("updated");
    let fresh = fs::metadata(&stamp).and_then(|m| m.modified()).map(|t| t.elapsed().map(|e| e.as_secs() < 3600).unwrap_or(false)).unwrap_or(false);
    if !fresh {
        quiet(apt(&conf, "apt-get").args(["update", "-q", "-o", "APT::Update::Error-Mode=any"]))
            .or_else(|_| quiet(apt(&conf, "apt-get").args(["update", "-q"])))?;
        fs::write(&stamp, b"")?;
    }
    Ok(conf)
}

fn newest(conf: &Path, s: &Series) -> Result<Option<String>> {
    let list = output(apt(conf, "apt-cache").args(["pkgnames", s.prefix]))?;
    let mut names: Vec<&str> = list
        .lines()
        .filter(|n| n.ends_with(s.suffix) && !n.contains("-dbg"))
        .filter(|n| s.name != "7.x" || n.trim_start_matches(s.prefix).split('.').next().and_then(|m| m.parse::<u32>().ok()).is_some_and(|m| m >= 7))
        .collect();
    names.sort_by_key(|n| version_key(n));
    Ok(names.last().map(|n| n.to_string()))
}

pub fn fetch(conf: &Path, s: &Series) -> Result<Fetched> {
    let Some(pkg) = newest(conf, s)? else {
        if s.may_be_retired {
            return Ok(Fetched::Retired(format!("Debian no longer serves {} ({}): no {}*{} package", s.suite, s.name, s.prefix, s.suffix)));
        }
        bail!("no kernel package {}*{} in {}: cannot test {}", s.prefix, s.suffix, s.suite, s.name);
    };
    let mut pkgs = vec![pkg.clone()];
    if s.name == "7.x" {
        let v = pkg.trim_start_matches(s.prefix).trim_end_matches(s.suffix);
        pkgs.push(format!("linux-modules-{v}-cloud-amd64"));
    }
    let root = cache_dir().join("kernels").join(&pkg);
    let done = root.join(".unpacked");
    if !done.exists() {
        let debs = cache_dir().join("debs");
        fs::create_dir_all(&debs)?;
        quiet(apt(conf, "apt-get").arg("download").args(&pkgs).current_dir(&debs))?;
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for p in &pkgs {
            let deb = fs::read_dir(&debs)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{p}_")) && n.ends_with(".deb")))
                .ok_or_else(|| anyhow!("downloaded {p} but its .deb is not in {}", debs.display()))?;
            quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
        fs::write(&done, b"")?;
    }
    locate(&root).map(Fetched::Ready)
}

fn locate(root: &Path) -> Result<Kernel> {
    let modroot = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| anyhow!("no lib/modules in {}", root.display()))?;
    let release = fs::read_dir(&modroot)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| anyhow!("empty {}", modroot.display()))?;
    let modules = modroot.join(&release);
    let vmlinuz = [root.join(format!("boot/vmlinuz-{release}")), modules.join("vmlinuz.unsigned"), modules.join("vmlinuz")]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("no vmlinuz for {release} in {}", root.display()))?;
    // Debian generates modules.dep at install time; do it here. depmod looks under
    // BASE/lib/modules, so give it that view of /usr/lib/modules.
    if !modules.join("modules.dep").exists() {
        let base = root.join("depmod-base");
        fs::create_dir_all(base.join("lib"))?;
        let link = base.join("lib/modules");
        if !link.exists() {
            std::os::unix::fs::symlink(&modroot, &link)?;
        }
        run(Command::new("depmod").arg("-b").arg(&base).arg(&release)).context("depmod (from kmod; `cargo xtask setup` installs it)")?;
    }
    Ok(Kernel { release, vmlinuz, modules })
}

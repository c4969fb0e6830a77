//! What the kernel itself reports about pinned and locked memory, from /proc: VmPin and
//! VmLck per process, RLIMIT_MEMLOCK, and the FOLL_PIN counters of /proc/vmstat. The
//! engine compares them with what pinwatch saw; they can differ for good reasons
//! (README: "pinwatch and the kernel disagree").

use std::collections::{BTreeSet, HashMap};

use procfs::process::{LimitValue, Process};

use crate::trace::KernelProc;

/// One process as /proc shows it.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub comm: String,
    pub uid: u32,
    pub kernel: KernelProc,
}

pub fn proc_info(pid: u32) -> Option<ProcInfo> {
    let p = Process::new(pid as i32).ok()?;
    let st = p.status().ok()?;
    let memlock = p.limits().ok().map(|l| match l.max_locked_memory.soft_limit {
        LimitValue::Unlimited => None,
        LimitValue::Value(v) => Some(v),
    });
    Some(ProcInfo {
        comm: st.name,
        uid: st.ruid,
        kernel: KernelProc {
            vmpin_bytes: st.vmpin.unwrap_or(0) * 1024,
            vmlck_bytes: st.vmlck.unwrap_or(0) * 1024,
            memlock_limit_bytes: memlock.flatten(),
        },
    })
}

/// `wanted`, and with `discover` every process the kernel charges pinned or locked
/// memory to: those are worth a row even when pinwatch saw none of their pins (taken
/// before it started, or invisible on this kernel). Discovery reads every process's
/// status, so only the view that shows them asks for it.
pub fn snapshot(wanted: &BTreeSet<u32>, discover: bool) -> HashMap<u32, ProcInfo> {
    let mut out: HashMap<u32, ProcInfo> = wanted.iter().filter_map(|pid| proc_info(*pid).map(|i| (*pid, i))).collect();
    if !discover {
        return out;
    }
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            let pid = p.pid as u32;
            if out.contains_key(&pid) {
                continue;
            }
            let Ok(st) = p.status() else { continue };
            if st.vmpin.unwrap_or(0) > 0 || st.vmlck.unwrap_or(0) > 0 {
                if let Some(info) = proc_info(pid) {
                    out.insert(pid, info);
                }
            }
        }
    }
    out
}

/// The file mapped at `addr` in `pid`, from /proc/PID/maps; None for anonymous memory
/// or a process already gone.
pub fn mapped_path(pid: u32, addr: u64) -> Option<String> {
    let maps = Process::new(pid as i32).ok()?.maps().ok()?;
    let m = maps.iter().find(|m| m.address.0 <= addr && addr < m.address.1)?;
    match &m.pathname {
        procfs::process::MMapPath::Path(p) => Some(p.display().to_string()),
        _ => None,
    }
}

/// nr_foll_pin_acquired and nr_foll_pin_released (base pages, since boot).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FollPinCounters {
    pub nr_foll_pin_acquired: i64,
    pub nr_foll_pin_released: i64,
}

pub fn foll_pin_counters() -> Option<FollPinCounters> {
    let v = procfs::vmstat().ok()?;
    Some(FollPinCounters { nr_foll_pin_acquired: *v.get("nr_foll_pin_acquired")?, nr_foll_pin_released: *v.get("nr_foll_pin_released")? })
}

/// A user's name from the password database, else the uid.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0i8; 4096];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned()
    } else {
        uid.to_string()
    }
}

/// A process's uid and cgroup v2 path ("/system.slice/x.service"), for exemptions;
/// None for what cannot be read (the process has ended).
pub fn identity(pid: u32) -> (Option<u32>, Option<String>) {
    let Ok(p) = Process::new(pid as i32) else { return (None, None) };
    let uid = p.uid().ok();
    let cgroup = p.cgroups().ok().and_then(|c| c.0.into_iter().find(|g| g.hierarchy == 0).map(|g| g.pathname));
    (uid, cgroup)
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup on current distributions,
/// /sys/fs/cgroup/unified on hybrid hosts (read from /proc/self/mounts).
pub fn cgroup2_root() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| m.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        }))
        .unwrap_or_else(|| "/sys/fs/cgroup".into())
}
/// Directories a walk of the cgroup tree reads at most.
const CGROUP_WALK_MAX: usize = 100_000;

/// cgroup ids (what bpf_get_current_cgroup_id returns: the cgroup directory's inode
/// number on cgroup v2) as paths. The tree is walked again only when an id is unknown,
/// at most once per `refresh`.
#[derive(Default)]
pub struct CgroupNames {
    by_id: HashMap<u64, String>,
    walked: bool,
}

impl CgroupNames {
    /// Allows one more walk of the tree (call once per tick).
    pub fn refresh(&mut self) {
        self.walked = false;
    }

    /// The path of cgroup `id`, or "id:N" for one that has gone or cannot be found.
    pub fn name(&mut self, id: u64) -> String {
        if !self.by_id.contains_key(&id) && !self.walked {
            self.walked = true;
            self.by_id = walk_cgroups();
        }
        self.by_id.get(&id).cloned().unwrap_or_else(|| format!("id:{id}"))
    }
}

fn walk_cgroups() -> HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = HashMap::new();
    let root = cgroup2_root();
    let root = root.as_path();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        if out.len() >= CGROUP_WALK_MAX {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        let rel = dir.strip_prefix(root).map(|r| format!("/{}", r.display())).unwrap_or_else(|_| "/".into());
        out.insert(meta.ino(), rel);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    out
}

//! `pinwatch selftest`: proves a running daemon's detection end to end on a live host.
//! It provokes a benign hazard on memory of its own (a memfd registered as io_uring
//! fixed buffers, FOLL_PIN | FOLL_LONGTERM, then truncated while registered: the kernel
//! drops pinned page cache) and asks the daemon, over its HTTP port, whether the hazard
//! reached the metric (`pinwatch_hazards_total`) and an alert line (`/alerts`, the
//! latest lines the daemon wrote).

use std::{ffi::CString, net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;

use crate::output::alert::config::DEFAULT_LISTEN;

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when the daemon reported the provoked hazard as a metric and an alert line; \
1 when it did not (what is missing is said); 2 on an error (no daemon answering, io_uring refused).")]
pub struct SelftestArgs {
    /// The daemon's metrics address (its --listen).
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub daemon: SocketAddr,
    /// How long to wait for the daemon to report the hazard.
    #[arg(long, value_parser = crate::args::duration, default_value = "20s")]
    pub timeout: Duration,
}

/// Pages of the memfd: few, so the selftest's alert is one line and a short summary.
const PAGES: usize = 4;
const PAGE: usize = 4096;
const KIND: &str = "truncate_while_pinned";

/// GET `path` from the daemon; the body as text.
async fn get(daemon: SocketAddr, path: &str) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(daemon).await.with_context(|| format!("connecting to the daemon at {daemon} (is `pinwatch alert` running, with this --listen?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path).header(hyper::header::HOST, daemon.to_string()).body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    if !res.status().is_success() {
        bail!("GET {path} from {daemon}: {}", res.status());
    }
    let body = res.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The sum of a family's samples whose line contains `label`.
fn sum(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the selftest did: its pid and the memfd's inode, to find its alert.
struct Provoked {
    pid: u32,
    ino: u64,
}

fn check(ret: libc::c_long, what: &str) -> Result<libc::c_long> {
    if ret < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// The hazard, on memory of our own: nothing else is touched.
fn provoke() -> Result<Provoked> {
    const IORING_REGISTER_BUFFERS: u32 = 0;
    const IORING_UNREGISTER_BUFFERS: u32 = 1;
    let len = PAGES * PAGE;
    let name = CString::new("pinwatch-selftest")?;
    // SAFETY: plain syscalls on objects this function creates and closes.
    unsafe {
        let fd = check(libc::memfd_create(name.as_ptr(), 0) as _, "memfd_create")? as i32;
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstat(fd, &mut st) as _, "fstat")?;
        check(libc::ftruncate(fd, len as _) as _, "ftruncate")?;
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        if map == libc::MAP_FAILED {
            bail!("mmap of the memfd: {}", std::io::Error::last_os_error());
        }
        for i in 0..PAGES {
            *(map as *mut u8).add(i * PAGE) = 0x5a;
        }
        // io_uring_params is 120 bytes; zeroed asks for the defaults.
        let mut params = [0u8; 120];
        let ring = check(libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()), "io_uring_setup (io_uring disabled here?)")?;
        let iov = libc::iovec { iov_base: map, iov_len: len };
        let registered = check(libc::syscall(libc::SYS_io_uring_register, ring, IORING_REGISTER_BUFFERS, &iov as *const _, 1u32), "registering io_uring fixed buffers");
        if registered.is_ok() {
            // The device may still write these pages; the file no longer has them.
            let _ = check(libc::ftruncate(fd, 0) as _, "ftruncate to 0");
            let _ = libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32);
        }
        libc::close(ring as i32);
        libc::munmap(map, len);
        libc::close(fd);
        registered?;
        Ok(Provoked { pid: std::process::id(), ino: st.st_ino })
    }
}

pub async fn run(args: SelftestArgs) -> Result<i32> {
    let metrics = get(args.daemon, "/metrics").await?;
    let mode = metrics.lines().find(|l| l.starts_with("pinwatch_build_info")).and_then(|l| l.split("mode=\"").nth(1)?.split('"').next()).unwrap_or("?").to_string();
    let before = sum(&metrics, "pinwatch_hazards_total", &format!("kind=\"{KIND}\""));
    let p = provoke()?;
    println!("selftest: pid {} truncated memfd inode {} ({PAGES} pages) while io_uring held it pinned", p.pid, p.ino);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let (mut metric_ok, mut line) = (false, None::<serde_json::Value>);
    while tokio::time::Instant::now() < deadline && !(metric_ok && line.is_some()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = get(args.daemon, "/metrics").await?;
        metric_ok = sum(&m, "pinwatch_hazards_total", &format!("kind=\"{KIND}\"")) > before;
        let alerts = get(args.daemon, "/alerts").await?;
        line = alerts
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|a| a["kind"] == KIND && a["file"]["ino"].as_u64() == Some(p.ino));
    }
    let mut ok = true;
    if metric_ok {
        println!("selftest: metric: pinwatch_hazards_total{{kind=\"{KIND}\"}} rose past {before}");
    } else {
        ok = false;
        println!("selftest: FAILED: pinwatch_hazards_total{{kind=\"{KIND}\"}} did not rise within {:?}", args.timeout);
    }
    match &line {
        Some(a) => {
            println!("selftest: alert line: {} {} of inode {} at {}", a["severity"].as_str().unwrap_or("?"), KIND, p.ino, a["time"].as_str().unwrap_or("?"));
            let pinner_pids: Vec<u64> = match &a["pinner"] {
                serde_json::Value::Array(v) => v.iter().filter_map(|x| x["pid"].as_u64()).collect(),
                x => x["pid"].as_u64().into_iter().collect(),
            };
            if mode == "tracepoint_only" {
                println!("selftest: not checked here: the pinner (tracepoint-only mode sees the kernel's pin count, not who pinned)");
            } else if pinner_pids.contains(&(p.pid as u64)) {
                println!("selftest: the alert names this selftest (pid {}) as the pinner", p.pid);
            } else {
                ok = false;
                println!("selftest: FAILED: the alert names pinners {pinner_pids:?}, not pid {}", p.pid);
            }
        }
        None => {
            ok = false;
            println!(
                "selftest: FAILED: no alert line for inode {} within {:?} (is {KIND} at its severity filtered out by [alert] or exempt in the configuration?)",
                p.ino, args.timeout
            );
        }
    }
    println!("selftest: {}", if ok { "passed" } else { "FAILED" });
    Ok(if ok { 0 } else { 1 })
}

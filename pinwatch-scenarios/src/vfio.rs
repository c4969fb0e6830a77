//! VFIO's type1 IOMMU container: what QEMU and DPDK do before a device may DMA into
//! their memory. VFIO_IOMMU_MAP_DMA pins every page of the range long-term
//! (pin_user_pages_remote with FOLL_LONGTERM) and charges it to VmLck, not VmPin.
//! The lab binds QEMU's emulated `edu` device to vfio-pci behind an emulated Intel
//! IOMMU and hands its IOMMU group to `vfio-map`.

use std::{ffi::CString, io::Write, thread::sleep, time::Duration};

use anyhow::{bail, Result};

use crate::{check, kb_of, map_anon_small, report, PAGE};

// linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n), VFIO_TYPE ';', VFIO_BASE 100.
const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}
const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);
const VFIO_API_VERSION: i64 = 0;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
/// Where the mapping goes in the device's address space: below the x86 MSI window.
const IOVA: u64 = 1 << 28;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn open_dev(path: &str) -> Result<i32> {
    let c = CString::new(path)?;
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    check(fd as _, &format!("open {path}"))?;
    Ok(fd)
}

fn ioctl(fd: i32, req: u64, arg: u64, what: &str) -> Result<i64> {
    Ok(check(unsafe { libc::ioctl(fd, req as _, arg) } as _, what)? as i64)
}

/// Maps `pages` pages of anonymous memory for DMA through IOMMU group `group`, holds
/// them for `hold_ms`, unmaps them. Says `PINWATCH-SCENARIO-VMLCK <kB> <kB>`: VmLck
/// and VmPin while mapped.
pub fn map(group: u32, pages: usize, hold_ms: u64) -> Result<()> {
    let container = open_dev("/dev/vfio/vfio")?;
    let version = ioctl(container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
    if version != VFIO_API_VERSION {
        bail!("VFIO API version {version}, not {VFIO_API_VERSION}");
    }
    if ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU, "VFIO_CHECK_EXTENSION")? != 1 {
        bail!("the VFIO container has no type1v2 IOMMU (vfio_iommu_type1 not loaded?)");
    }
    let group_fd = open_dev(&format!("/dev/vfio/{group}"))?;
    let mut status = GroupStatus { argsz: std::mem::size_of::<GroupStatus>() as u32, flags: 0 };
    ioctl(group_fd, VFIO_GROUP_GET_STATUS, &mut status as *mut _ as u64, "VFIO_GROUP_GET_STATUS")?;
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        bail!("IOMMU group {group} is not viable: a device in it is not bound to vfio-pci");
    }
    ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container as *const i32 as u64, "VFIO_GROUP_SET_CONTAINER")?;
    ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU, "VFIO_SET_IOMMU")?;
    let buf = map_anon_small(pages)?;
    let size = (pages * PAGE) as u64;
    let dma = DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: buf as u64,
        iova: IOVA,
        size,
    };
    report("vfio-map", pages, &format!(",\"group\":{group}"));
    ioctl(container, VFIO_IOMMU_MAP_DMA, &dma as *const _ as u64, "VFIO_IOMMU_MAP_DMA")?;
    println!("PINWATCH-SCENARIO-VMLCK {} {}", kb_of("/proc/self/status", "VmLck:"), kb_of("/proc/self/status", "VmPin:"));
    let _ = std::io::stdout().flush();
    sleep(Duration::from_millis(hold_ms));
    let mut unmap = DmaUnmap { argsz: std::mem::size_of::<DmaUnmap>() as u32, flags: 0, iova: IOVA, size };
    ioctl(container, VFIO_IOMMU_UNMAP_DMA, &mut unmap as *mut _ as u64, "VFIO_IOMMU_UNMAP_DMA")?;
    if unmap.size != size {
        bail!("VFIO_IOMMU_UNMAP_DMA unmapped {} of {size} bytes", unmap.size);
    }
    unsafe {
        libc::close(group_fd);
        libc::close(container);
        libc::munmap(buf as *mut _, pages * PAGE);
    }
    Ok(())
}

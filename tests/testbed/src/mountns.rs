//! A resolver configuration of the calling process's own: what a test client needs to
//! resolve names through the system resolver (getaddrinfo) against a DNS server the test
//! chose, without touching the machine's `/etc/resolv.conf`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{bail, Result};

/// Gives the calling thread (and what it starts) `resolv_conf` as its
/// `/etc/resolv.conf`: a mount namespace of its own, unshared with every mount made
/// private, and the file bind-mounted over the system's. Nothing outside sees it; it
/// goes when the thread's process exits. Needs root.
pub fn use_resolv_conf(resolv_conf: &Path) -> Result<()> {
    let source = CString::new(resolv_conf.as_os_str().as_bytes())?;
    let target = CString::new("/etc/resolv.conf")?;
    let root = CString::new("/")?;
    // SAFETY: plain syscalls on NUL-terminated paths that outlive them.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
        }
        let private = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            private,
            std::ptr::null(),
        ) != 0
        {
            bail!("making / private: {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "bind-mounting {} over /etc/resolv.conf: {}",
                resolv_conf.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

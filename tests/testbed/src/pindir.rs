//! A throw-away directory in bpffs for the agent to pin its maps and links in.
//!
//! Invariants:
//! - bpffs is mounted at [`BPFFS_MOUNT`] before the directory is made (mounting it is
//!   idempotent: an existing bpffs mount there is reused, never stacked);
//! - the directory is fresh and uniquely named; `Drop` removes it recursively. Unlinking
//!   a pinned link detaches its program once no process holds it, so removing the
//!   directory after the agent has exited leaves nothing attached.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where bpffs is (made) mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS_MOUNT`] unless `/proc/mounts` shows one there already.
///
/// Returns whether it mounted it.
pub fn ensure_bpffs_mounted() -> Result<bool> {
    if bpffs_mounted()? {
        return Ok(false);
    }
    crate::require_root("mounting bpffs")?;
    std::fs::create_dir_all(BPFFS_MOUNT).with_context(|| format!("creating {BPFFS_MOUNT}"))?;
    let target = CString::new(BPFFS_MOUNT).context("mount point")?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings living across the call; data
    // may be NULL.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mount -t bpf bpf {BPFFS_MOUNT}"));
    }
    Ok(true)
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_source, target, kind) = (f.next(), f.next(), f.next());
        target == Some(BPFFS_MOUNT) && kind == Some("bpf")
    }))
}

/// A uniquely named directory below [`BPFFS_MOUNT`]; removed recursively on `Drop`.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Mounts bpffs if needed and creates `/sys/fs/bpf/detour-test-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        crate::require_root("creating a bpffs pin directory")?;
        ensure_bpffs_mounted()?;
        let path = crate::create_unique_dir(Path::new(BPFFS_MOUNT))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every pinned object below the directory, as paths relative to it (sorted).
    pub fn pinned(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut todo = vec![self.path.clone()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    todo.push(entry.path());
                } else if let Ok(rel) = entry.path().strip_prefix(&self.path) {
                    out.push(rel.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "detour-testbed: removing pin dir {}: {e}",
                self.path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dir_is_in_bpffs_and_removed() {
        crate::require_root("the pin dir test").unwrap();
        let dir = PinDir::new().unwrap();
        assert!(bpffs_mounted().unwrap());
        assert!(!ensure_bpffs_mounted().unwrap(), "second mount attempt");
        let path = dir.path().to_owned();
        assert!(path.starts_with(BPFFS_MOUNT) && path.is_dir());
        // bpffs allows plain subdirectories; pinned objects are files inside them.
        std::fs::create_dir(path.join("sub")).unwrap();
        assert!(dir.pinned().unwrap().is_empty());
        drop(dir);
        assert!(!path.exists());
    }
}

//! A scratch directory for config files, agent sockets and logs.
//!
//! Invariant: the directory is created fresh (never reused: creation fails if the name
//! exists) and removed recursively on `Drop`, unless [`TempDir::keep`] was called to
//! preserve diagnostics.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// A uniquely named directory below the system temp dir, removed on `Drop`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `$TMPDIR/detour-test-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        let path = crate::create_unique_dir(&std::env::temp_dir())?;
        Ok(Self { path, keep: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Leaves the directory in place when dropped (to look at logs after a failure).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            // Nothing useful to do on failure while dropping; the name is unique anyway.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_and_removed() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().to_owned();
        std::fs::write(dir.join("f"), "x").unwrap();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}

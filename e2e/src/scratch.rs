//! A per-test working directory (configs, keys, logs, sockets), emptied when made and removed on drop,
//! so a failed run leaves nothing behind for the next. `NODE_LAB_KEEP` keeps it (the path is printed)
//! for reading a failed lab's logs by hand.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// A scratch directory removed on drop (with any extra paths handed to [`ScratchDir::also_remove`]).
pub struct ScratchDir {
    dir: PathBuf,
    extra: Vec<PathBuf>,
}

impl ScratchDir {
    /// `<temp dir>/<name>`, empty; `name` should carry the process id or [`crate::netns::unique_tag`].
    pub fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, extra: Vec::new() })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path inside the directory.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.dir.join(p)
    }

    /// Also removes `p` (a file or directory outside the scratch directory, e.g. a UAPI socket) on drop.
    pub fn also_remove(&mut self, p: PathBuf) {
        self.extra.push(p);
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        for p in &self.extra {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
        if std::env::var_os("NODE_LAB_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

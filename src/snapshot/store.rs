//! Where snapshots are kept. [`LocalDir`] is a directory on this host; the
//! cluster work adds a shared store behind the same trait.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A place that holds at most one current snapshot.
pub trait SnapshotStore {
    /// The current snapshot's bytes, or None if there is none.
    fn load(&self) -> std::io::Result<Option<Vec<u8>>>;
    /// Replace the current snapshot, atomically: a reader sees the old one
    /// or the new one, whole.
    fn save(&self, bytes: &[u8]) -> std::io::Result<()>;
    /// Move the current snapshot aside as unusable; returns where to.
    fn quarantine(&self, suffix: &str) -> std::io::Result<String>;
}

/// Snapshots in a local directory: `players.snap`, written as a temporary
/// file, fsynced, renamed over the old one, and the directory fsynced.
pub struct LocalDir {
    dir: PathBuf,
}

/// File name of the current snapshot in the directory.
pub const FILE: &str = "players.snap";

impl LocalDir {
    pub fn new(dir: impl Into<PathBuf>) -> LocalDir {
        LocalDir { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl SnapshotStore for LocalDir {
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path()) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!("{FILE}.tmp.{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())?;
        fsync_dir(&self.dir)
    }

    fn quarantine(&self, suffix: &str) -> std::io::Result<String> {
        let to = self.dir.join(format!("{FILE}.{suffix}"));
        std::fs::rename(self.path(), &to)?;
        fsync_dir(&self.dir)?;
        Ok(to.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_quarantine() {
        let dir = std::env::temp_dir().join(format!("slg-store-{}", std::process::id()));
        let s = LocalDir::new(&dir);
        assert_eq!(s.load().expect("load"), None);
        s.save(b"one").expect("save");
        s.save(b"two").expect("save");
        assert_eq!(s.load().expect("load"), Some(b"two".to_vec()));
        let to = s.quarantine("corrupt").expect("quarantine");
        assert!(to.ends_with("players.snap.corrupt"));
        assert_eq!(s.load().expect("load"), None);
        assert_eq!(std::fs::read(&to).expect("moved"), b"two");
        let _ = std::fs::remove_dir_all(dir);
    }
}

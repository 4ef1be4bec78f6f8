//! Persistence of the enrolled pods, so a restarted agent still knows them:
//! without it a ztunnel reconnecting to a fresh agent would get an empty snapshot
//! and drop every pod. Each pod is saved with its namespace's inode; on load a pod
//! whose namespace is gone, or is now another namespace, is dropped. The file is
//! replaced whole (temp file, fsync, rename, fsync of the directory), so a crash
//! leaves the old or the new file, never a truncated one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

use mesh_core::os::NetNs;
use serde::{Deserialize, Serialize};

use crate::api::Pod;

/// Why the saved pods cannot be read. The agent does not start: starting empty
/// would make ztunnel drop every pod of the node.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the pod state file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pod state file {} is corrupt ({source}); refusing to start with no pods, \
         which would make ztunnel drop every pod of this node (move the file away to \
         start empty on purpose)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "another node agent holds the pod state file {} (its lock {}): two agents \
         would overwrite each other's pods",
        path.display(),
        lock.display()
    )]
    Locked { path: PathBuf, lock: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    pods: Vec<SavedPod>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedPod {
    pod: Pod,
    netns_inode: u64,
}

/// The file the pods are saved to (written whole, atomically, on every change).
#[derive(Debug, Clone)]
pub(crate) struct PodStore {
    path: PathBuf,
    // Held (flock, exclusive) while this store lives: one agent per state file.
    _lock: Option<Arc<Flock<File>>>,
}

/// Names each save's temp file apart from any other save's, even one still
/// finishing after its caller gave up on it.
static SAVES: AtomicU64 = AtomicU64::new(0);

impl PodStore {
    /// A store for `path` without its lock (tests that only read and write).
    #[cfg(test)]
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            _lock: None,
        }
    }

    /// The store of `path`, locked for this process (`<path>.lock`): a second
    /// agent on the same file is refused instead of overwriting this one's pods.
    pub(crate) fn locked(path: impl Into<PathBuf>) -> Result<Self, StateError> {
        let path = path.into();
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        let lock = PathBuf::from(lock);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|source| StateError::Read {
                path: lock.clone(),
                source,
            })?;
        let held =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| StateError::Locked {
                path: path.clone(),
                lock,
            })?;
        Ok(Self {
            path,
            _lock: Some(Arc::new(held)),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The saved pods whose namespaces still exist. A missing file is no pods (a
    /// first start); an unreadable or undecodable one is an error.
    pub(crate) fn load(&self, own_netns: u64) -> Result<Vec<(Pod, NetNs)>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let saved: Saved =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        Ok(saved
            .pods
            .into_iter()
            .filter_map(|SavedPod { pod, netns_inode }| {
                let netns = NetNs::open(&pod.netns).ok()?;
                let inode = netns.inode().ok()?;
                if inode != netns_inode || inode == own_netns {
                    tracing::info!(uid = %pod.uid, "saved pod's namespace is gone; forgetting it");
                    return None;
                }
                Some((pod, netns))
            })
            .collect())
    }

    /// Saves `pods`, replacing the file atomically.
    pub(crate) async fn save<'a>(
        &self,
        pods: impl Iterator<Item = (&'a Pod, &'a NetNs)>,
    ) -> std::io::Result<()> {
        let pods = pods
            .map(|(pod, netns)| {
                Ok(SavedPod {
                    pod: pod.clone(),
                    netns_inode: netns.inode()?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let body = serde_json::to_vec_pretty(&Saved { pods }).map_err(std::io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || replace_durably(&path, &body))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// Writes `body` to a temp file beside `path`, syncs it, renames it over `path` and
/// syncs the directory, so that after a crash `path` holds either the old or the
/// new content, whole.
fn replace_durably(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.to_owned().into_os_string();
    let save = SAVES.fetch_add(1, Ordering::Relaxed);
    tmp.push(format!(".tmp.{}.{save}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    if let Err(e) = write_and_rename(file, body, &tmp, path) {
        // Nothing else would ever remove it: each save's name is new.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `body` to `file` (at `tmp`), syncs it and renames it over `path`.
fn write_and_rename(mut file: File, body: &[u8], tmp: &Path, path: &Path) -> std::io::Result<()> {
    file.write_all(body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, netns: &Path) -> Pod {
        Pod {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            container_id: "c".into(),
            netns: netns.into(),
            ips: vec!["198.18.0.7".parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn saved_pods_come_back_unless_their_namespace_changed() {
        // Plain files stand in for namespace files: what is checked is the inode.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("ns-a"), dir.path().join("ns-b"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let store = PodStore::new(dir.path().join("pods.json"));
        assert!(store.load(0).unwrap().is_empty());

        let pods = [pod("uid-a", &a), pod("uid-b", &b)];
        let handles = [NetNs::open(&a).unwrap(), NetNs::open(&b).unwrap()];
        store.save(pods.iter().zip(handles.iter())).await.unwrap();
        let loaded: Vec<Pod> = store.load(0).unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(loaded, pods);
        // Replaced whole: no temp file is left beside it.
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["ns-a", "ns-b", "pods.json"]);

        // ns-b is replaced by another file: that pod is forgotten.
        std::fs::write(dir.path().join("other"), "").unwrap();
        std::fs::rename(dir.path().join("other"), &b).unwrap();
        let loaded: Vec<String> = store
            .load(0)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.uid)
            .collect();
        assert_eq!(loaded, ["uid-a"]);
    }

    #[test]
    fn a_corrupt_or_unreadable_state_is_an_error_not_an_empty_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = PodStore::new(dir.path().join("pods.json"));
        // A file cut short by a crash of an older agent.
        std::fs::write(store.path(), r#"{"pods":[{"pod":{"uid":"#).unwrap();
        let err = store.load(0).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("pods.json") && msg.contains("corrupt"),
            "{msg}"
        );

        // A directory where the file should be cannot be read.
        let store = PodStore::new(dir.path());
        assert!(matches!(store.load(0), Err(StateError::Read { .. })));
    }

    #[test]
    fn a_failed_save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: the rename onto it fails.
        let path = dir.path().join("pods.json");
        std::fs::create_dir(&path).unwrap();
        assert!(replace_durably(&path, b"{}").is_err());
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["pods.json"], "a temp file was left behind");
    }

    #[test]
    fn one_agent_per_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        let first = PodStore::locked(&path).unwrap();
        let err = PodStore::locked(&path).unwrap_err().to_string();
        assert!(err.contains("another node agent holds"), "{err}");
        // Clones share the one lock; it is free once the last goes.
        let clone = first.clone();
        drop(first);
        assert!(PodStore::locked(&path).is_err());
        drop(clone);
        PodStore::locked(&path).unwrap();
    }
}

//! Optional persistence of the enrolled pods, so a restarted agent still knows
//! them: without it a ztunnel reconnecting to a fresh agent would get an empty
//! snapshot and drop every pod. Each pod is saved with its namespace's inode; on
//! load a pod whose namespace is gone, or is now another namespace, is dropped.

use std::path::{Path, PathBuf};

use mesh_core::os::NetNs;
use serde::{Deserialize, Serialize};

use crate::api::Pod;

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
}

impl PodStore {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The saved pods whose namespaces still exist. A missing file is no pods; an
    /// unreadable one is logged and treated as none, so the agent still starts.
    pub(crate) fn load(&self, own_netns: u64) -> Vec<(Pod, NetNs)> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::error!(path = %self.path.display(), "cannot read the pod state: {e}");
                return Vec::new();
            }
        };
        let saved: Saved = match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(path = %self.path.display(), "ignoring undecodable pod state: {e}");
                return Vec::new();
            }
        };
        saved
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
            .collect()
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
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        tokio::fs::write(&tmp, body).await?;
        tokio::fs::rename(&tmp, &self.path).await
    }
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
        assert!(store.load(0).is_empty());

        let pods = [pod("uid-a", &a), pod("uid-b", &b)];
        let handles = [NetNs::open(&a).unwrap(), NetNs::open(&b).unwrap()];
        store.save(pods.iter().zip(handles.iter())).await.unwrap();
        let loaded: Vec<Pod> = store.load(0).into_iter().map(|(p, _)| p).collect();
        assert_eq!(loaded, pods);

        // ns-b is replaced by another file: that pod is forgotten.
        std::fs::write(dir.path().join("other"), "").unwrap();
        std::fs::rename(dir.path().join("other"), &b).unwrap();
        let loaded: Vec<String> = store.load(0).into_iter().map(|(p, _)| p.uid).collect();
        assert_eq!(loaded, ["uid-a"]);

        std::fs::write(store.path(), "not json").unwrap();
        assert!(store.load(0).is_empty());
    }
}

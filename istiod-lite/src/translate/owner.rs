//! The name of the workload that owns a pod, as Istio derives it for its
//! `workload_name` and the `source_workload`/`destination_workload` metric labels
//! (Istio's `GetDeployMetaFromPod`): one value per Deployment or CronJob, not one
//! per ReplicaSet, Job run or pod.

use crate::model::Pod;

/// The label a Deployment puts on its ReplicaSets' pods (and in their names).
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The pod's owning workload: a ReplicaSet's pod belongs to the Deployment named
/// by the ReplicaSet's name minus `-<pod-template-hash>`; a Job named
/// `<name>-<8 to 10 digits>` was started by the CronJob `<name>`; any other
/// controller (StatefulSet, DaemonSet, Job, a ReplicaSet of its own) is the
/// workload; a pod without one is its own.
pub(super) fn workload_name(pod: &Pod) -> String {
    let Some(controller) = &pod.controller else {
        return pod.meta.name.clone();
    };
    let name = controller.name.as_str();
    let owner = match controller.kind.as_str() {
        "ReplicaSet" => pod
            .meta
            .labels
            .get(POD_TEMPLATE_HASH)
            .filter(|hash| !hash.is_empty())
            .and_then(|hash| name.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-')),
        "Job" => cron_job_of(name),
        _ => None,
    };
    owner.filter(|n| !n.is_empty()).unwrap_or(name).to_owned()
}

/// `<cronjob>` of a Job named `<cronjob>-<schedule time in minutes>`.
fn cron_job_of(job: &str) -> Option<&str> {
    let (base, stamp) = job.rsplit_once('-')?;
    let digits = stamp.len();
    ((8..=10).contains(&digits) && stamp.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{pod, translator, up_pod, workload};
    use super::*;
    use crate::model::Controller;

    fn owned(kind: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        let mut p = pod("shop", "p-1", "198.18.0.1", labels);
        p.controller = Some(Controller {
            kind: kind.into(),
            name: name.into(),
        });
        p
    }

    #[test]
    fn the_owning_workload_is_named_as_istio_names_it() {
        let hash = [("pod-template-hash", "5d4f8b7c9")];
        let cases = [
            // A Deployment's pod: the ReplicaSet minus the hash.
            (owned("ReplicaSet", "web-5d4f8b7c9", &hash), "web"),
            (
                owned("ReplicaSet", "my-api-v2-5d4f8b7c9", &hash),
                "my-api-v2",
            ),
            // A bare ReplicaSet, or one whose name does not end in the hash.
            (owned("ReplicaSet", "web", &[]), "web"),
            (owned("ReplicaSet", "web-other", &hash), "web-other"),
            (owned("ReplicaSet", "5d4f8b7c9", &hash), "5d4f8b7c9"),
            (owned("StatefulSet", "db", &[]), "db"),
            (owned("DaemonSet", "agent", &[]), "agent"),
            (owned("Job", "migrate", &[]), "migrate"),
            (owned("Job", "migrate-v2", &[]), "migrate-v2"),
            // A CronJob's run: the CronJob.
            (owned("Job", "backup-28391040", &[]), "backup"),
            (owned("Job", "backup-1234567", &[]), "backup-1234567"),
            (
                owned("Job", "backup-12345678901", &[]),
                "backup-12345678901",
            ),
            (pod("shop", "bare", "198.18.0.1", &[]), "bare"),
        ];
        for (p, want) in cases {
            assert_eq!(workload_name(&p), want, "{:?}", p.controller);
        }
    }

    #[test]
    fn the_workload_carries_it() {
        let mut t = translator();
        let updates = t.apply(vec![
            up_pod(owned(
                "ReplicaSet",
                "web-5d4f8b7c9",
                &[("pod-template-hash", "5d4f8b7c9")],
            )),
            up_pod(pod("shop", "bare", "198.18.0.2", &[])),
        ]);
        let w = workload(&updates, "shop/p-1");
        assert_eq!((w.name.as_str(), w.workload_name.as_str()), ("p-1", "web"));
        assert_eq!(workload(&updates, "shop/bare").workload_name, "bare");
    }
}

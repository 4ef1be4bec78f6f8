//! The runtime's side of a call: the `CNI_*` environment and the `CNI_ARGS` pairs
//! (Kubernetes pod identity and Ambit's opt-out).

use std::path::PathBuf;
use std::str::FromStr;

use super::error::{CniError, ErrorCode};

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
}

impl FromStr for CniCommand {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("unknown CNI_COMMAND `{other}` (expected ADD, DEL, CHECK or VERSION)"),
            )),
        }
    }
}

/// The `CNI_ARGS` this plugin reads; other keys are ignored (as `IgnoreUnknown`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub service_account: Option<String>,
    /// False when `AMBIT_ENROLL=false`: the pod stays out of the mesh.
    pub enroll: bool,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Empty values count as absent. A bad entry is an error.
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let (args, mut errors) = Self::parse_lenient(raw);
        if errors.is_empty() {
            Ok(args)
        } else {
            Err(errors.swap_remove(0))
        }
    }

    /// Parses what it can: a bad entry is left out (for `AMBIT_ENROLL`, the
    /// default stays) and its error returned beside the rest.
    pub fn parse_lenient(raw: &str) -> (Self, Vec<CniError>) {
        let mut args = Self {
            enroll: true,
            ..Self::default()
        };
        let mut errors = Vec::new();
        for pair in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                errors.push(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS entry `{pair}` is not KEY=VALUE"),
                ));
                continue;
            };
            let value = (!value.is_empty()).then(|| value.to_owned());
            match key {
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_UID" => args.pod_uid = value,
                "K8S_POD_SERVICE_ACCOUNT" => args.service_account = value,
                "AMBIT_ENROLL" => match parse_enroll(value.as_deref()) {
                    Ok(enroll) => args.enroll = enroll,
                    Err(e) => errors.push(e),
                },
                _ => {}
            }
        }
        (args, errors)
    }
}

fn parse_enroll(value: Option<&str>) -> Result<bool, CniError> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_ARGS AMBIT_ENROLL=`{other}`: expected true or false"),
        )),
    }
}

/// Everything the runtime passed in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: CniCommand,
    /// Empty only for VERSION.
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
}

impl CniEnv {
    /// Reads the environment through `var` (so tests need not set real variables).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let command: CniCommand = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set"))?
            .parse()?;
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if command != CniCommand::Version && container_id.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_CONTAINERID is not set",
            ));
        }
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if matches!(command, CniCommand::Add | CniCommand::Check) && netns.is_none() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_NETNS is not set",
            ));
        }
        let raw_args = get("CNI_ARGS").unwrap_or_default();
        let args = match command {
            CniCommand::Add | CniCommand::Check => CniArgs::parse(&raw_args)?,
            // A DEL refused for its args could never succeed, and the runtime
            // could never tear the sandbox down: what parses is used, the rest
            // logged (VERSION reads no args at all).
            CniCommand::Del | CniCommand::Version => {
                let (args, errors) = CniArgs::parse_lenient(&raw_args);
                for e in errors {
                    tracing::warn!(container = %container_id, "{} (ignored for {command:?})", e.msg);
                }
                args
            }
        };
        Ok(Self {
            command,
            container_id,
            netns,
            ifname: get("CNI_IFNAME"),
            args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn kubernetes_args_are_read_and_unknown_keys_ignored() {
        let args = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678;K8S_POD_SERVICE_ACCOUNT=web;",
        )
        .unwrap();
        assert_eq!(
            args,
            CniArgs {
                pod_name: Some("web-0".into()),
                pod_namespace: Some("shop".into()),
                pod_uid: Some("1234-5678".into()),
                service_account: Some("web".into()),
                enroll: true,
            }
        );
        assert_eq!(
            CniArgs::parse("").unwrap(),
            CniArgs {
                enroll: true,
                ..CniArgs::default()
            }
        );
        // A value may itself hold '='; an empty one counts as absent.
        let args = CniArgs::parse("K8S_POD_NAME=a=b;K8S_POD_UID=").unwrap();
        assert_eq!(args.pod_name.as_deref(), Some("a=b"));
        assert_eq!(args.pod_uid, None);
    }

    #[test]
    fn opt_out_and_bad_pairs() {
        assert!(!CniArgs::parse("AMBIT_ENROLL=false").unwrap().enroll);
        assert!(!CniArgs::parse("AMBIT_ENROLL=FALSE").unwrap().enroll);
        assert!(CniArgs::parse("AMBIT_ENROLL=true").unwrap().enroll);
        let err = CniArgs::parse("AMBIT_ENROLL=maybe").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("maybe"));
        let err = CniArgs::parse("K8S_POD_NAME").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("K8S_POD_NAME"));
    }

    fn env_of(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_requirements_per_command() {
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=web-0"),
        ])
        .unwrap();
        assert_eq!(env.command, CniCommand::Add);
        assert_eq!(env.netns, Some(PathBuf::from("/run/netns/p1")));
        assert_eq!(env.args.pod_name.as_deref(), Some("web-0"));

        assert_eq!(
            env_of(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            CniCommand::Version
        );
        // DEL may come without a namespace (it may be gone already).
        assert!(env_of(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")]).is_ok());
        for (pairs, needle) in [
            (&[][..], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "FROB")][..], "FROB"),
            (
                &[("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/x")][..],
                "CNI_CONTAINERID",
            ),
            (
                &[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c")][..],
                "CNI_NETNS",
            ),
        ] {
            let err = env_of(pairs).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment);
            assert!(err.msg.contains(needle), "{} lacks {needle}", err.msg);
        }
    }
}

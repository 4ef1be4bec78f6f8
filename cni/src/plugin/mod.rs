//! The chained CNI plugin: reads the runtime's environment and config, asks the
//! node agent to enroll, un-enroll or check the pod, and prints the result (the
//! previous plugin's, unchanged) or a CNI error.
//!
//! DEL is best effort, as the spec asks: it succeeds when the agent is down or
//! does not know the pod (the pod's namespace, and the rules in it, are going
//! away anyway; a restarted agent cleans what it is told about). ADD fails
//! closed: an enrolled pod whose redirection cannot be set up does not start.

mod client;
mod conf;
mod env;
mod error;

pub use client::{AgentClient, ClientError};
pub use conf::{NetConf, PREFERRED_VERSION, SUPPORTED_VERSIONS, version_output};
pub use env::{CniArgs, CniCommand, CniEnv};
pub use error::{CniError, ErrorCode};

use crate::api::{AgentReply, AgentRequest, FailureKind, Pod};

/// What the process prints on stdout and its exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginOutput {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one plugin invocation: `var` reads the environment, `stdin` is the config.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> PluginOutput {
    match dispatch(var, stdin) {
        Ok(stdout) => PluginOutput {
            stdout,
            exit_code: 0,
        },
        Err(err) => {
            tracing::error!(code = err.code as u32, details = %err.details, "{}", err.msg);
            PluginOutput {
                stdout: err.to_json(&NetConf::version_of(stdin)),
                exit_code: 1,
            }
        }
    }
}

fn dispatch(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let env = CniEnv::from_vars(var)?;
    if env.command == CniCommand::Version {
        return Ok(version_output(&NetConf::version_of(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    let client = AgentClient::new(conf.agent_socket(), conf.timeout());
    match env.command {
        CniCommand::Add => add(&env, &conf, &client),
        CniCommand::Del => Ok(del(&env, &client)),
        CniCommand::Check => check(&env, &conf, &client).map(|()| String::new()),
        CniCommand::Version => Ok(version_output(&conf.cni_version)),
    }
}

/// The pod as the agent sees it; Kubernetes args first, the container id when
/// there are none (plain runtimes).
pub fn pod_of(env: &CniEnv, ips: Vec<std::net::IpAddr>) -> Pod {
    let args = &env.args;
    Pod {
        uid: uid_of(env),
        name: args
            .pod_name
            .clone()
            .unwrap_or_else(|| env.container_id.clone()),
        namespace: args
            .pod_namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        service_account: args
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into()),
        container_id: env.container_id.clone(),
        netns: env.netns.clone().unwrap_or_default(),
        ips,
    }
}

fn uid_of(env: &CniEnv) -> String {
    env.args
        .pod_uid
        .clone()
        .unwrap_or_else(|| env.container_id.clone())
}

fn add(env: &CniEnv, conf: &NetConf, client: &AgentClient) -> Result<String, CniError> {
    let result = conf.passthrough_result()?;
    if !env.args.enroll {
        tracing::info!(container = %env.container_id, "AMBIT_ENROLL=false: pod left out of the mesh");
        return Ok(result);
    }
    let ips = conf.pod_ips()?;
    refuse_ipv6(&ips)?;
    let pod = pod_of(env, ips);
    let uid = pod.uid.clone();
    match client.request(&AgentRequest::Add { pod }) {
        Ok(AgentReply::Ok { detail, .. }) => {
            if let Some(detail) = detail {
                tracing::info!(%uid, "{detail}");
            }
            Ok(result)
        }
        Ok(AgentReply::Failed { kind, message }) => Err(agent_failure(kind, message)),
        Err(e) => Err(unreachable_agent(e)),
    }
}

/// The redirection is IPv4 only (and ztunnel listens on IPv4 only): a pod with
/// an IPv6 address would send its IPv6 traffic around the mesh, so it is refused
/// rather than enrolled half-way.
fn refuse_ipv6(ips: &[std::net::IpAddr]) -> Result<(), CniError> {
    match ips.iter().find(|ip| ip.is_ipv6()) {
        None => Ok(()),
        Some(v6) => Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!(
                "IPv6 is not supported yet by the Ambit mesh: the pod has {v6} and its IPv6 \
                 traffic would bypass the mesh; give the pod IPv4 addresses only, or opt it \
                 out with CNI_ARGS AMBIT_ENROLL=false"
            ),
        )),
    }
}

fn del(env: &CniEnv, client: &AgentClient) -> String {
    let uid = uid_of(env);
    let request = AgentRequest::Del {
        uid: uid.clone(),
        container_id: Some(env.container_id.clone()),
        netns: env.netns.clone(),
    };
    match client.request(&request) {
        Ok(AgentReply::Ok { .. }) => {}
        Ok(AgentReply::Failed { message, .. }) => {
            tracing::warn!(%uid, "DEL: the agent could not remove the pod (ignored): {message}")
        }
        Err(e) => tracing::warn!(%uid, "DEL: {e} (ignored: DEL is best effort)"),
    }
    String::new()
}

fn check(env: &CniEnv, conf: &NetConf, client: &AgentClient) -> Result<(), CniError> {
    if !conf.supports_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, got {}",
                conf.cni_version
            ),
        ));
    }
    if !env.args.enroll {
        return Ok(());
    }
    match client.request(&AgentRequest::Check { uid: uid_of(env) }) {
        Ok(AgentReply::Ok { .. }) => Ok(()),
        Ok(AgentReply::Failed { kind, message }) => Err(agent_failure(kind, message)),
        Err(e) => Err(unreachable_agent(e)),
    }
}

fn agent_failure(kind: FailureKind, message: String) -> CniError {
    let code = match kind {
        FailureKind::UnknownPod => ErrorCode::UnknownContainer,
        FailureKind::Ztunnel => ErrorCode::TryAgainLater,
        FailureKind::BadRequest => ErrorCode::InvalidConfig,
        FailureKind::Netns | FailureKind::Rules | FailureKind::Internal => ErrorCode::Internal,
    };
    CniError::new(code, format!("ambit node agent: {message}"))
}

fn unreachable_agent(err: ClientError) -> CniError {
    let details = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    CniError::new(ErrorCode::TryAgainLater, err.to_string()).with_details(details)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

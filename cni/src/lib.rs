//! Ambit pod enrollment: the chained CNI plugin ([`plugin`]) that a container
//! runtime calls for every pod, and the node agent ([`agent`]) that installs the
//! in-pod redirection ([`redirect`]) and hands each pod's network namespace to
//! ztunnel over the zds protocol ([`zds`]). The plugin and the agent talk over a
//! Unix stream socket with the JSON messages of [`api`].

pub mod agent;
pub mod api;
pub mod plugin;
pub mod redirect;
pub mod zds;

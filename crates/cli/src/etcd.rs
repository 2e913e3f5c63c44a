//! How `serve --etcd` and `gateway --etcd` reach a secured etcd: credentials and TLS.

use std::path::PathBuf;

use clap::Args;

/// etcd credentials and TLS, shared by the commands that talk to etcd.
#[derive(Args, Clone, Default)]
pub struct EtcdAccess {
    /// etcd user (with etcd's authentication on; `etcdctl auth enable`). Give it the
    /// read-write permission on --etcd-prefix only.
    #[arg(long, requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// Its password (or LASTMILE_ETCD_PASSWORD; never passed on to child processes).
    #[arg(
        long,
        env = "LASTMILE_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    pub etcd_password: Option<String>,
    /// PEM file of the CA that signed etcd's certificates, for https:// endpoints (default:
    /// the system's roots).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd's --client-cert-auth (with --etcd-key).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Restart a watch that brought nothing for this many seconds (after listing again), so
    /// that a connection that died without a word is noticed.
    #[arg(long, default_value_t = 30)]
    pub etcd_watch_idle_secs: u64,
}

impl EtcdAccess {
    /// The client settings for these endpoints.
    pub fn config(&self, endpoints: Vec<String>) -> lastmile_discovery::EtcdConfig {
        let mut c = lastmile_discovery::EtcdConfig::new(endpoints);
        c.user = self.etcd_user.clone().zip(self.etcd_password.clone());
        c.ca = self.etcd_ca.clone();
        c.cert = self.etcd_cert.clone().zip(self.etcd_key.clone());
        c.watch_idle = std::time::Duration::from_secs(self.etcd_watch_idle_secs.max(1));
        c
    }
}

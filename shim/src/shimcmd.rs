//! The shim process itself: `start` (daemonize, print the address), `delete` (clean up after a dead
//! shim), and serving the task service — via the `containerd-shim` crate (0.11, task API v2).
use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{
    api::DeleteResponse,
    asynchronous::{publisher::RemotePublisher, spawn, util::write_str_to_file, ExitSignal, Shim},
    Config as ShimConfig, Flags, StartOpts,
};
use tracing::info;

use crate::{config::Config, mounts, sandbox, task::TaskService};

pub const RUNTIME_ID: &str = "io.containerd.kata-rs.v2";

/// A file in the bundle naming the configuration file a runtime option chose at create, so that
/// `delete` after a dead shim cleans up with the same configuration (its runtime root).
pub const CONFIG_PATH_FILE: &str = "kata-rs-config-path";

pub struct KataShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: PathBuf,
}

/// How containerd-shim must behave for us: we reap our own children (QEMU and its daemons are
/// tokio children) and log through `tracing`.
pub fn shim_config() -> ShimConfig {
    ShimConfig { no_setup_logger: true, default_log_level: "info".into(), no_reaper: true, no_sub_reaper: true }
}

/// Kills and removes what a shim of container `id` left behind: VM processes, mounts, directories.
pub fn cleanup_after_dead_shim(config: &Config, id: &str, bundle: &std::path::Path) -> Vec<u32> {
    let dir = sandbox::Sandbox::dir_for(config, id);
    let killed = vmm::vm::cleanup_dir(&dir);
    // The VM's host cgroup, once its killed processes have left it.
    crate::cgroups::remove_recorded(&dir, std::time::Duration::from_secs(5));
    // The shared directory's tmpfs goes with every mount below it (the rootfs bind mount).
    sandbox::remove_sandbox_dir(&dir);
    mounts::unmount_if_mounted(&bundle.join("rootfs"));
    killed
}

/// The id a container's shim is grouped by: its pod's sandbox id (CRI's annotations in the bundle's
/// config.json), else its own. A bundle that cannot be read groups by the container's id; Create
/// then reports what is wrong with it.
pub fn grouping_of(bundle: &std::path::Path, id: &str) -> String {
    let Ok(raw) = std::fs::read(bundle.join("config.json")) else {
        return id.to_string();
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&raw) else {
        return id.to_string();
    };
    match crate::spec::pod_role(&spec, id) {
        Ok(role) => role.group(id).to_string(),
        Err(_) => id.to_string(),
    }
}

#[async_trait]
impl Shim for KataShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() { std::env::current_dir().unwrap_or_default() } else { PathBuf::from(&args.bundle) };
        KataShim { exit: Arc::new(ExitSignal::default()), id: args.id.clone(), namespace: args.namespace.clone(), bundle }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim (and one VM) per container, or per pod: a pod's containers are grouped by their
        // sandbox id, so the address of the sandbox's shim is given for them (a second shim started
        // on that address finds it serving and leaves).
        // Nothing is logged here: containerd reads this command's stdout and stderr together as the address.
        let grouping = grouping_of(&self.bundle, &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The configuration the task was created with (a runtime option may have named it).
        let explicit = std::fs::read_to_string(self.bundle.join(CONFIG_PATH_FILE)).ok().map(|s| PathBuf::from(s.trim()));
        let config = Config::discover(explicit.as_deref()).unwrap_or_default();
        let killed = cleanup_after_dead_shim(&config, &self.id, &self.bundle);
        info!(id = %self.id, ?killed, "cleaned up after a dead shim");
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let service = TaskService::new(publisher, self.namespace.clone(), self.exit.clone());
        service.exit_if_unused(crate::runtime::UNUSED_SHIM_EXIT);
        service
    }
}

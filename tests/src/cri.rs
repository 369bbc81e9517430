//! A synchronous CRI v1 client (the kubelet's API of containerd's CRI plugin) for tests and for
//! `kata-rs-cri`: pods, containers, exec, checkpoint, and the restore of a container from a checkpoint
//! archive. The client is generated from `proto/api.proto` (k8s.io/cri-api) by build.rs; [`Cri`] owns a
//! tokio runtime and blocks on each call, like the rest of the harness (do not call it from async code).
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use tonic::transport::Channel;

/// The generated CRI v1 messages and the RuntimeService/ImageService clients.
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::{image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, ContainerConfig};
pub use api::{ContainerState, PodSandboxConfig, PodSandboxState};

/// The runtime service client the calls of [`Cri`] are made with.
pub type Client = RuntimeServiceClient<Channel>;

/// How long a call may take unless it says otherwise (RunPodSandbox boots a VM; TCG is slow).
const CALL_LIMIT: Duration = Duration::from_secs(300);

/// A pod as a test describes it (also `kata-rs-cri`'s pod JSON: these field names, all optional but
/// `name`). Becomes the pod's [`PodSandboxConfig`] ([`PodSpec::to_config`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    /// Kubernetes namespace of the pod (metadata), "default" when empty.
    pub namespace: String,
    /// The pod's uid (metadata), its name when empty.
    pub uid: String,
    pub hostname: Option<String>,
    /// Where CRI writes the containers' logs (a container's `log_path` is relative to it).
    pub log_directory: String,
    /// A runtime of the CRI config's `runtimes` table (`kata-rs`, `runc`); empty: containerd's default.
    pub runtime_handler: String,
    pub cgroup_parent: Option<String>,
    /// One PID namespace for the pod's containers (Kubernetes' shareProcessNamespace); otherwise each
    /// container has its own, as the kubelet asks by default.
    pub share_process_namespace: bool,
    /// The host's network, IPC and PID namespaces (Kubernetes' hostNetwork, hostIPC, hostPID: CRI's NODE).
    pub host_network: bool,
    pub host_ipc: bool,
    pub host_pid: bool,
    /// The pod may hold privileged containers (CRI refuses them in a pod that is not).
    pub privileged: bool,
    /// The pod's memory limit (the sum of its containers' limits, as the kubelet gives it), bytes.
    pub memory_limit_bytes: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A container as a test describes it (also `kata-rs-cri`'s container JSON: these field names, all
/// optional but `name` and `image`). Becomes its [`ContainerConfig`] ([`ContainerSpec::to_config`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    /// An image in containerd's k8s.io namespace (or, for a restore, the checkpoint archive's path).
    pub image: String,
    /// The entrypoint (replaces the image's); empty: the image's.
    pub command: Vec<String>,
    /// Arguments (replace the image's Cmd); empty: the image's.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The log file, relative to the pod's `log_directory`; empty: no log.
    pub log_path: String,
    pub working_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Host paths mounted in the container (Kubernetes' hostPath volumes, as the kubelet gives them).
    pub mounts: Vec<HostMount>,
    /// Kubernetes' readOnlyRootFilesystem.
    pub readonly_rootfs: bool,
    /// Kubernetes' privileged.
    pub privileged: bool,
    /// The container's memory limit, bytes (swap limited to it too, as the kubelet does without swap).
    pub memory_limit_bytes: Option<i64>,
}

/// A host path mounted in a container: CRI's Mount.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostMount {
    pub host_path: String,
    pub container_path: String,
    pub readonly: bool,
    /// `recursiveReadOnly: Enabled` (needs readonly, and private propagation).
    pub recursive_read_only: bool,
    /// "" or "private" (None), "host_to_container", "bidirectional".
    pub propagation: String,
}

impl HostMount {
    fn to_api(&self) -> api::Mount {
        let propagation = match self.propagation.as_str() {
            "host_to_container" => api::MountPropagation::PropagationHostToContainer,
            "bidirectional" => api::MountPropagation::PropagationBidirectional,
            _ => api::MountPropagation::PropagationPrivate,
        };
        api::Mount {
            container_path: self.container_path.clone(),
            host_path: self.host_path.clone(),
            readonly: self.readonly,
            recursive_read_only: self.recursive_read_only,
            propagation: propagation as i32,
            ..Default::default()
        }
    }
}

/// What PodSandboxStatus says of a pod.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub state: PodSandboxState,
    /// The pod's address from CNI (empty without one).
    pub ip: String,
    pub additional_ips: Vec<String>,
    pub runtime_handler: String,
}

/// What ContainerStatus says of a container.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    /// Meaningful once the state is `ContainerExited`.
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The container's CRI log file (absolute; empty without one).
    pub log_path: String,
    pub image: String,
    pub image_ref: String,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub annotations: HashMap<String, String>,
}

/// The outcome of ExecSync.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// One of our maps as a CRI map.
fn to_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl PodSpec {
    /// A pod named `name` in namespace `default` under runtime handler `handler`, logging to `log_directory`.
    pub fn new(name: &str, handler: &str, log_directory: &Path) -> PodSpec {
        PodSpec { name: name.into(), runtime_handler: handler.into(), log_directory: log_directory.display().to_string(), ..Default::default() }
    }

    /// The PodSandboxConfig RunPodSandbox (and every CreateContainer in the pod) is given.
    pub fn to_config(&self) -> PodSandboxConfig {
        let or = |v: &str, d: &str| {
            if v.is_empty() {
                d.to_string()
            } else {
                v.to_string()
            }
        };
        PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: or(&self.uid, &self.name),
                namespace: or(&self.namespace, "default"),
                attempt: 0,
            }),
            hostname: self.hostname.clone().unwrap_or_default(),
            log_directory: self.log_directory.clone(),
            labels: to_map(&self.labels),
            annotations: to_map(&self.annotations),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone().unwrap_or_default(),
                security_context: Some(api::LinuxSandboxSecurityContext { namespace_options: Some(self.namespaces()), privileged: self.privileged, ..Default::default() }),
                resources: self.memory_limit_bytes.map(|m| api::LinuxContainerResources { memory_limit_in_bytes: m, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The kubelet's namespace options: the pod's network and IPC namespaces, the PID namespace per
    /// container unless the pod shares it (CRI's zero value, POD, would share it).
    fn namespaces(&self) -> api::NamespaceOption {
        let node_or = |host: bool, m: api::NamespaceMode| if host { api::NamespaceMode::Node } else { m } as i32;
        let pid = if self.share_process_namespace { api::NamespaceMode::Pod } else { api::NamespaceMode::Container };
        api::NamespaceOption {
            network: node_or(self.host_network, api::NamespaceMode::Pod),
            pid: node_or(self.host_pid, pid),
            ipc: node_or(self.host_ipc, api::NamespaceMode::Pod),
            ..Default::default()
        }
    }
}

impl ContainerSpec {
    /// A container `name` of `image` running `args` (the image's Cmd when empty).
    pub fn new(name: &str, image: &str, args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        }
    }

    /// The ContainerConfig CreateContainer is given.
    pub fn to_config(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: self.name.clone(), attempt: 0 }),
            image: Some(api::ImageSpec { image: self.image.clone(), user_specified_image: self.image.clone(), ..Default::default() }),
            command: self.command.clone(),
            args: self.args.clone(),
            working_dir: self.working_dir.clone().unwrap_or_default(),
            envs: self.env.iter().map(|(k, v)| api::KeyValue { key: k.clone(), value: v.clone() }).collect(),
            labels: to_map(&self.labels),
            annotations: to_map(&self.annotations),
            log_path: self.log_path.clone(),
            mounts: self.mounts.iter().map(HostMount::to_api).collect(),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext { readonly_rootfs: self.readonly_rootfs, privileged: self.privileged, ..Default::default() }),
                resources: self.memory_limit_bytes.map(|m| api::LinuxContainerResources { memory_limit_in_bytes: m, memory_swap_limit_in_bytes: m, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl From<api::ContainerStatus> for ContainerInfo {
    fn from(s: api::ContainerStatus) -> ContainerInfo {
        ContainerInfo {
            state: s.state(),
            name: s.metadata.map(|m| m.name).unwrap_or_default(),
            image: s.image.map(|i| i.image).unwrap_or_default(),
            id: s.id,
            exit_code: s.exit_code,
            reason: s.reason,
            message: s.message,
            log_path: s.log_path,
            image_ref: s.image_ref,
            started_at_ns: s.started_at,
            finished_at_ns: s.finished_at,
            annotations: s.annotations,
        }
    }
}

/// A connection to containerd's CRI service, with the configs of the pods it started.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: Client,
    images: ImageServiceClient<Channel>,
    /// The PodSandboxConfig each pod run through this client was run with: CreateContainer needs it.
    pods: Mutex<HashMap<String, PodSandboxConfig>>,
}

impl Cri {
    /// Connects to containerd's gRPC socket `address` (a path; a `unix://` prefix is accepted).
    pub fn connect(address: &str) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let path = address.strip_prefix("unix://").unwrap_or(address).to_string();
        let channel = rt.block_on(containerd_client::connect(&path)).with_context(|| format!("connecting to {path}"))?;
        Ok(Cri { rt, client: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel), pods: Mutex::new(HashMap::new()) })
    }

    /// Runs one call on a clone of the client with a deadline of `limit`; `what` names it in errors.
    pub fn call_for<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.wait(what, limit, f(self.client.clone()))
    }

    /// Blocks on the call `fut` for up to `limit`; `what` names it in errors.
    fn wait<T>(&self, what: &str, limit: Duration, fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>) -> Result<T> {
        match self.rt.block_on(async { tokio::time::timeout(limit, fut).await }) {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(anyhow!("CRI {what}: {} ({:?})", s.message(), s.code())),
            Err(_) => Err(anyhow!("CRI {what}: no answer within {limit:?}")),
        }
    }

    /// [`Cri::call_for`] with the default deadline: for requests without a helper here, e.g.
    /// `cri.call("ListPodSandbox", |mut c| async move { c.list_pod_sandbox(req).await })`.
    pub fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_for(what, CALL_LIMIT, f)
    }

    pub fn version(&self) -> Result<api::VersionResponse> {
        let req = api::VersionRequest { version: "v1".into() };
        self.call("Version", |mut c| async move { c.version(req).await })
    }

    /// PullImage (ImageService) of `image` from its registry; returns its image_ref. An image pulled so
    /// has a repo digest, which CRI then reports as a container's image_ref (see [`Cri::restore_container`]).
    pub fn pull_image(&self, image: &str) -> Result<String> {
        let req = api::PullImageRequest { image: Some(api::ImageSpec { image: image.into(), ..Default::default() }), ..Default::default() };
        let mut c = self.images.clone();
        Ok(self.wait("PullImage", CALL_LIMIT, async move { c.pull_image(req).await })?.image_ref)
    }

    /// Status: are the conditions RuntimeReady and NetworkReady (CNI configuration loaded) true?
    pub fn ready(&self) -> Result<bool> {
        let r = self.call("Status", |mut c| async move { c.status(api::StatusRequest { verbose: false }).await })?;
        let conditions = r.status.map(|s| s.conditions).unwrap_or_default();
        Ok(["RuntimeReady", "NetworkReady"].iter().all(|t| conditions.iter().any(|c| c.r#type == *t && c.status)))
    }

    /// Waits until [`Cri::ready`] (the CRI plugin loads the CNI configuration asynchronously).
    pub fn wait_ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.ready()? {
            anyhow::ensure!(start.elapsed() < limit, "CRI runtime or network not ready after {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// RunPodSandbox; returns the pod's id. Its config is kept for [`Cri::create_container`].
    pub fn run_pod_sandbox(&self, pod: &PodSpec) -> Result<String> {
        let config = pod.to_config();
        let req = api::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: pod.runtime_handler.clone() };
        let id = self.call("RunPodSandbox", |mut c| async move { c.run_pod_sandbox(req).await })?.pod_sandbox_id;
        self.pods.lock().unwrap().insert(id.clone(), config);
        Ok(id)
    }

    /// The config pod `id` was run with through this client.
    pub fn pod_config(&self, id: &str) -> Option<PodSandboxConfig> {
        self.pods.lock().unwrap().get(id).cloned()
    }

    /// PodSandboxStatus of pod `id`.
    pub fn pod_status(&self, id: &str) -> Result<PodInfo> {
        let req = api::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        let s = self.call("PodSandboxStatus", |mut c| async move { c.pod_sandbox_status(req).await })?.status.context("no status")?;
        let net = s.network.clone().unwrap_or_default();
        Ok(PodInfo { state: s.state(), ip: net.ip, additional_ips: net.additional_ips.into_iter().map(|p| p.ip).collect(), runtime_handler: s.runtime_handler })
    }

    /// StopPodSandbox: stops the pod's containers and its sandbox, releases its network.
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("StopPodSandbox", |mut c| async move { c.stop_pod_sandbox(req).await }).map(drop)
    }

    /// RemovePodSandbox (stops it first if needed) and forgets its config.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("RemovePodSandbox", |mut c| async move { c.remove_pod_sandbox(req).await })?;
        self.pods.lock().unwrap().remove(id);
        Ok(())
    }

    /// CreateContainer in pod `pod_id` (run through this client); returns the container's id.
    pub fn create_container(&self, pod_id: &str, spec: &ContainerSpec) -> Result<String> {
        let pod = self.pod_config(pod_id).with_context(|| format!("pod {pod_id} was not run through this client"))?;
        self.create_container_in(pod_id, &pod, spec)
    }

    /// CreateContainer in pod `pod_id`, whose config was `pod` (CRI wants it again with each container).
    pub fn create_container_in(&self, pod_id: &str, pod: &PodSandboxConfig, spec: &ContainerSpec) -> Result<String> {
        let mut config = spec.to_config();
        // As the kubelet does: the container's namespace options are the pod's.
        let ns = pod.linux.as_ref().and_then(|l| l.security_context.as_ref()).and_then(|s| s.namespace_options.clone());
        config.linux.get_or_insert_with(Default::default).security_context.get_or_insert_with(Default::default).namespace_options = ns;
        self.create(pod_id, pod, config)
    }

    fn create(&self, pod_id: &str, pod: &PodSandboxConfig, config: ContainerConfig) -> Result<String> {
        let req = api::CreateContainerRequest { pod_sandbox_id: pod_id.into(), config: Some(config), sandbox_config: Some(pod.clone()) };
        Ok(self.call("CreateContainer", |mut c| async move { c.create_container(req).await })?.container_id)
    }

    /// A container restored from the checkpoint archive at `archive` (made by
    /// [`Cri::checkpoint_container`]) into pod `pod_id`, run through this client. containerd 2.1 takes a
    /// CreateContainer whose image is an existing file as such an archive: `spec` gives the name (unique
    /// in the pod) and log path; its env, labels and annotations are merged into the checkpointed
    /// container's, its image, command, args and working directory are ignored (`spec.image` may stay
    /// empty). The restore itself happens at [`Cri::start_container`].
    ///
    /// containerd 2.1 first *pulls* the checkpointed container's base image, by the image_ref its
    /// ContainerStatus had (a repo digest `name@sha256:…` when the image has one, else the image id
    /// `sha256:…`), with the default registry resolver (not the CRI plugin's registry config;
    /// plain HTTP only for localhost registries). An image only imported with `ctr images import` has
    /// no repo digest, so its restore fails there: the base image must come from a reachable
    /// registry (e.g. one on localhost in the test's network namespace, through [`Cri::pull_image`]).
    pub fn restore_container(&self, pod_id: &str, archive: &Path, spec: &ContainerSpec) -> Result<String> {
        let pod = self.pod_config(pod_id).with_context(|| format!("pod {pod_id} was not run through this client"))?;
        self.restore_container_in(pod_id, &pod, archive, spec)
    }

    /// [`Cri::restore_container`] into a pod whose config was `pod`.
    pub fn restore_container_in(&self, pod_id: &str, pod: &PodSandboxConfig, archive: &Path, spec: &ContainerSpec) -> Result<String> {
        let spec = ContainerSpec { image: archive.display().to_string(), ..spec.clone() };
        self.create(pod_id, pod, spec.to_config())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let req = api::StartContainerRequest { container_id: id.into() };
        self.call("StartContainer", |mut c| async move { c.start_container(req).await }).map(drop)
    }

    /// StopContainer: SIGTERM (or the image's stop signal), SIGKILL after `timeout_s` seconds.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let req = api::StopContainerRequest { container_id: id.into(), timeout: timeout_s };
        self.call_for("StopContainer", limit_after(timeout_s), |mut c| async move { c.stop_container(req).await }).map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest { container_id: id.into() };
        self.call("RemoveContainer", |mut c| async move { c.remove_container(req).await }).map(drop)
    }

    /// ContainerStatus of container `id`.
    pub fn container_status(&self, id: &str) -> Result<ContainerInfo> {
        let req = api::ContainerStatusRequest { container_id: id.into(), verbose: false };
        let s = self.call("ContainerStatus", |mut c| async move { c.container_status(req).await })?.status.context("no status")?;
        Ok(s.into())
    }

    /// Waits until container `id` is in `state`; returns its status then.
    pub fn wait_container_state(&self, id: &str, state: ContainerState, limit: Duration) -> Result<ContainerInfo> {
        let start = Instant::now();
        loop {
            let s = self.container_status(id)?;
            if s.state == state {
                return Ok(s);
            }
            anyhow::ensure!(start.elapsed() < limit, "container {id} is {:?}, not {state:?}, after {limit:?}", s.state);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// ExecSync of `cmd` in container `id`, killed after `timeout_s` seconds (0: no limit).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_s: i64) -> Result<ExecOutput> {
        let req = api::ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|a| a.to_string()).collect(), timeout: timeout_s };
        let r = self.call_for("ExecSync", limit_after(timeout_s), |mut c| async move { c.exec_sync(req).await })?;
        Ok(ExecOutput {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// ListContainers, of pod `pod_id` only when given.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<api::Container>> {
        let filter = pod_id.map(|p| api::ContainerFilter { pod_sandbox_id: p.into(), ..Default::default() });
        let req = api::ListContainersRequest { filter };
        Ok(self.call("ListContainers", |mut c| async move { c.list_containers(req).await })?.containers)
    }

    /// CheckpointContainer: containerd writes the checkpoint archive (a tar) to `location` (a path
    /// on its host); the container goes on running.
    pub fn checkpoint_container(&self, id: &str, location: &Path, timeout_s: i64) -> Result<()> {
        let req = api::CheckpointContainerRequest { container_id: id.into(), location: location.display().to_string(), timeout: timeout_s };
        self.call_for("CheckpointContainer", limit_after(timeout_s), |mut c| async move { c.checkpoint_container(req).await }).map(drop)
    }
}

/// The deadline of a call that itself waits up to `timeout_s` seconds (0 or less: the default).
fn limit_after(timeout_s: i64) -> Duration {
    CALL_LIMIT.max(Duration::from_secs(timeout_s.max(0) as u64 + 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_spec_fills_in_namespace_uid_and_cgroup_parent() {
        let mut p = PodSpec::new("web", "kata-rs", Path::new("/logs"));
        p.cgroup_parent = Some("/kata".into());
        p.annotations.insert("io.kata-rs.x".into(), "1".into());
        let c = p.to_config();
        let m = c.metadata.unwrap();
        assert_eq!((m.name.as_str(), m.uid.as_str(), m.namespace.as_str()), ("web", "web", "default"));
        assert_eq!(c.log_directory, "/logs");
        assert_eq!(c.linux.unwrap().cgroup_parent, "/kata");
        assert_eq!(c.annotations["io.kata-rs.x"], "1");
    }

    #[test]
    fn a_container_spec_maps_env_and_log_path() {
        let mut s = ContainerSpec::new("app", "img", &["sleep", "9"]);
        s.env.insert("A".into(), "b".into());
        let c = s.to_config();
        assert_eq!(c.args, ["sleep", "9"]);
        assert!(c.command.is_empty());
        assert_eq!(c.log_path, "app.log");
        assert_eq!((c.envs[0].key.as_str(), c.envs[0].value.as_str()), ("A", "b"));
        assert_eq!(c.image.unwrap().image, "img");
    }

    #[test]
    fn json_specs_use_the_field_names() {
        let p: PodSpec = serde_json::from_str(r#"{"name": "p", "runtime_handler": "runc", "annotations": {"k": "v"}}"#).unwrap();
        assert_eq!((p.name.as_str(), p.runtime_handler.as_str(), p.annotations["k"].as_str()), ("p", "runc", "v"));
        let c: ContainerSpec = serde_json::from_str(r#"{"name": "c", "image": "i", "command": ["sh"], "env": {"X": "1"}}"#).unwrap();
        assert_eq!((c.command.len(), c.env["X"].as_str()), (1, "1"));
        assert!(serde_json::from_str::<PodSpec>(r#"{"nmae": "typo"}"#).is_err());
    }

    #[test]
    fn calls_that_wait_get_a_longer_deadline() {
        assert_eq!(limit_after(0), CALL_LIMIT);
        assert_eq!(limit_after(600), Duration::from_secs(660));
    }
}

//! Create: the bundle read and checked, then a new VM (a container of its own, a pod's sandbox) or a
//! place in the pod's running VM, the container's mounts, a restore's images staged, the hooks, and
//! the agent's CreateContainer.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_client::{agent as ag, AgentClient};
use containerd_shim::{
    api::*,
    protos::{events::task::*, topics::*, ttrpc},
};
use tracing::{info, warn};

use crate::{
    cgroups,
    checkpoint::{self, Staging},
    config::Config,
    error::TaskError,
    hooks, mounts, network,
    process::*,
    runtime::*,
    safefs::Dir,
    sandbox::Sandbox,
    spec,
};

/// What Create reads from the bundle and the configuration before anything is made.
pub(crate) struct Parsed {
    pub(crate) config: Config,
    pub(crate) bundle: PathBuf,
    pub(crate) role: spec::PodRole,
    pub(crate) adapted: spec::Adapted,
    pub(crate) spec_json: serde_json::Value,
    pub(crate) deadline_s: u64,
    pub(crate) open_tcp: bool,
    pub(crate) hooks: hooks::Hooks,
    pub(crate) hook_spec: serde_json::Value,
}

/// A pod's VM at most: 256 GiB and 64 vCPUs, whatever limits the pod asks for.
pub(crate) const MAX_POD_MEMORY_MIB: u32 = 256 << 10;

pub(crate) const MAX_POD_VCPUS: u32 = 64;

pub(crate) fn mount_err(e: mounts::MountError) -> ttrpc::Error {
    match e {
        e @ mounts::MountError::VolumeSource { .. } => TaskError::invalid(e.to_string()),
        e => TaskError::internal(e.to_string()),
    }
}

pub(crate) fn parse_create(req: &CreateTaskRequest) -> ttrpc::Result<Parsed> {
    if !req.checkpoint.is_empty() && !Path::new(&req.checkpoint).join("inventory.img").is_file() {
        return Err(TaskError::invalid(format!("checkpoint {} holds no CRIU images (no inventory.img)", req.checkpoint)));
    }
    let explicit = match req.options.as_ref() {
        Some(o) => crate::config::config_path_from_options(&o.type_url, &o.value).map_err(|e| TaskError::invalid(e))?,
        None => None,
    };
    let config = Config::discover(explicit.as_deref()).map_err(|e| TaskError::invalid(e.to_string()))?;
    let bundle = PathBuf::from(&req.bundle);
    if let Some(p) = &explicit {
        std::fs::write(bundle.join(crate::shimcmd::CONFIG_PATH_FILE), p.as_os_str().as_encoded_bytes())
            .map_err(|e| TaskError::internal(format!("{}: {e}", bundle.display())))?;
    }
    let bad = |e: String| TaskError::invalid(format!("{}/config.json: {e}", req.bundle));
    let raw = std::fs::read(bundle.join("config.json")).map_err(|e| bad(e.to_string()))?;
    let spec_json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    let role = spec::pod_role(&spec_json, &req.id).map_err(|e| bad(e.to_string()))?;
    let adapted = spec::adapt_for_guest(&raw, &format!("{GUEST_SHARED}/{}", req.id)).map_err(|e| bad(e.to_string()))?;
    let deadline_s = checkpoint::deadline_from_spec(&spec_json, config.runtime.checkpoint_deadline_s)?;
    let open_tcp = checkpoint::open_tcp_from_spec(&spec_json)?;
    let hooks = hooks::Hooks::from_spec(&spec_json).map_err(|e| bad(e.to_string()))?;
    if !hooks.not_run.is_empty() {
        warn!(hooks = ?hooks.not_run, "these hooks would run in the container's namespaces, which are in the VM: not run");
    }
    let hook_spec = serde_json::json!({"ociVersion": spec_json.get("ociVersion"), "annotations": spec_json.get("annotations")});
    if !adapted.dropped_mounts.is_empty() || !adapted.dropped_namespace_paths.is_empty() {
        warn!(mounts = ?adapted.dropped_mounts, namespaces = ?adapted.dropped_namespace_paths, ?role, "host-only parts of the spec are not available in the VM (a pod's namespaces are joined in the VM)");
    }
    if !adapted.volumes.is_empty() {
        info!(volumes = ?adapted.volumes.iter().map(|v| (&v.source, &v.destination, v.readonly)).collect::<Vec<_>>(), "volumes (host bind mounts) shared with the VM");
    }
    Ok(Parsed { config, bundle, role, adapted, spec_json, deadline_s, open_tcp, hooks, hook_spec })
}

impl TaskService {
    /// A new VM for a container of its own or a pod's sandbox container: the sandbox directory, the
    /// container's mounts, the boot, then the container in it and the namespace's interfaces.
    pub(crate) async fn create_with_vm(&self, req: &CreateTaskRequest, c: Parsed) -> ttrpc::Result<(PodVm, TaskState)> {
        let mut config = c.config.clone();
        if let spec::PodRole::Sandbox(_) = c.role {
            let h = &config.hypervisor;
            let (mem, cpus) = spec::pod_size(&c.spec_json, h.memory_mib, h.vcpus, MAX_POD_MEMORY_MIB, MAX_POD_VCPUS)
                .map_err(|e| TaskError::invalid(format!("{}/config.json: {e}", req.bundle)))?;
            info!(memory_mib = mem, vcpus = cpus, base_memory_mib = h.memory_mib, base_vcpus = h.vcpus, "pod VM size: the base plus the pod's limits");
            config.hypervisor.memory_mib = mem;
            config.hypervisor.vcpus = cpus;
        }
        let mut prepared = Sandbox::prepare(&config, c.role.group(&req.id)).map_err(|e| TaskError::internal(e.to_string()))?;
        prepared.netns = spec::network_namespace(&c.spec_json);
        // Every VM runs in a host cgroup with a memory limit: the spec's (a pod's, below the kubelet's
        // pod cgroup: its accounting and limits cover the VM), else one of kata-rs's own.
        let cgroup_path = c.spec_json.pointer("/linux/cgroupsPath").and_then(serde_json::Value::as_str).filter(|p| !p.is_empty());
        let cgroup_path = cgroup_path.map(str::to_string).unwrap_or_else(|| format!("/kata-rs/{}", c.role.group(&req.id)));
        if let Err(e) = cgroups::relative_path(&cgroup_path) {
            prepared.discard();
            return Err(TaskError::invalid(e.to_string()));
        }
        let mem = config.hypervisor.memory_mib as u64;
        prepared.cgroup = Some((cgroup_path, cgroups::vm_memory_limit(mem, crate::sandbox::shared_dir_bytes(mem))));
        info!(netns = ?prepared.netns, "QEMU's network namespace");
        let mounts = match mounts::ContainerMounts::setup(&c.bundle, &req.rootfs, &c.adapted.volumes, prepared.shared(), &req.id) {
            Ok(m) => m,
            Err(e) => {
                prepared.discard();
                return Err(mount_err(e));
            }
        };
        let sandbox = match Sandbox::boot(&config, prepared).await {
            Ok(s) => s,
            Err(e) => {
                mounts.teardown();
                return Err(TaskError::internal(e.to_string()));
            }
        };
        let (agent, shared, qemu_pid, mem) = (sandbox.agent.clone(), sandbox.shared.clone(), sandbox.vm.qemu_pid(), config.hypervisor.memory_mib as u64);
        let network = network::Network::default();
        let vm = PodVm { id: c.role.group(&req.id).to_string(), pod: matches!(c.role, spec::PodRole::Sandbox(_)), sandbox, network, guest_mem_mib: mem };
        let mut st = match self.create_in_vm(req, c, agent.clone(), shared, qemu_pid, mem, mounts).await {
            Ok(st) => st,
            Err((e, mounts)) => {
                warn!(id = %req.id, error = %e, console_tail = %vm.sandbox.vm.console_tail(4000), "create failed; the guest console's end follows");
                vm.stop(Some(&mounts)).await;
                return Err(e);
            }
        };
        st.meter = vm.sandbox.meter();
        // Interfaces already in the namespace (CRI's pod network, a createRuntime hook's) reach the
        // container now; later ones (ctr run --cni) at Start.
        let mut vm = vm;
        if let Err(e) = sync_network(&mut vm.network, &vm.sandbox.vm, &agent, &req.id).await {
            vm.stop(Some(&st.mounts)).await;
            return Err(e);
        }
        Ok((vm, st))
    }

    /// One of a pod's containers, in the VM its sandbox container booted: mounts made in the running
    /// VM's shared directory (through pinned descriptors: the guest writes there), then the container.
    pub(crate) async fn create_in_pod(&self, req: &CreateTaskRequest, c: Parsed) -> ttrpc::Result<TaskState> {
        let (agent, shared, host_pid, mem, meter) = {
            let g = self.state.lock().await;
            let vm = g.vm.as_ref().ok_or_else(|| TaskError::vm_gone(format!("container {}: its pod's VM is gone", req.id)))?;
            (vm.sandbox.agent.clone(), vm.sandbox.shared.clone(), vm.sandbox.vm.qemu_pid(), vm.guest_mem_mib, vm.sandbox.meter())
        };
        let mounts = mounts::ContainerMounts::setup(&c.bundle, &req.rootfs, &c.adapted.volumes, &shared, &req.id).map_err(mount_err)?;
        let shared2 = shared.clone();
        match self.create_in_vm(req, c, agent, shared, host_pid, mem, mounts).await {
            Ok(st) => Ok(TaskState { meter, ..st }),
            Err((e, mut mounts)) => {
                mounts.teardown_in_running_vm(&shared2);
                Err(e)
            }
        }
    }

    /// The container in a running VM: a restore's images staged, the createRuntime and prestart hooks,
    /// the agent's CreateContainer. On failure the mounts come back for the caller to undo.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create_in_vm(
        &self,
        req: &CreateTaskRequest,
        c: Parsed,
        agent: AgentClient,
        shared: Arc<Dir>,
        host_pid: u32,
        guest_mem_mib: u64,
        mounts: mounts::ContainerMounts,
    ) -> Result<TaskState, (ttrpc::Error, mounts::ContainerMounts)> {
        let restore = !req.checkpoint.is_empty();
        let mut restore_staging = None;
        if restore {
            // Images from containerd (trusted, but bounded all the same) into the guest-writable shared
            // directory, through pinned descriptors: nothing the guest placed there is followed.
            let limits = checkpoint::image_limits(max_image_bytes(guest_mem_mib));
            let (shared, from_path, id) = (shared.clone(), PathBuf::from(&req.checkpoint), req.id.clone());
            // Blocking file I/O of up to gigabytes: off the async workers, so other calls still answer.
            let staged = tokio::task::spawn_blocking(move || {
                Staging::for_restore(&shared, &id).and_then(|st| {
                    let from = Dir::open_host(&from_path)?;
                    let r = crate::safefs::copy_tree(&from, &st.dir, limits);
                    if r.is_err() {
                        st.remove();
                    }
                    r.map(|_| st)
                })
            })
            .await
            .unwrap_or_else(|e| Err(crate::safefs::SafeFsError::Io { path: req.checkpoint.clone(), source: std::io::Error::other(e.to_string()) }));
            match staged {
                Ok(st) => restore_staging = Some(st),
                Err(e) => return Err((TaskError::invalid(format!("staging checkpoint {} for the guest: {e}", req.checkpoint)), mounts)),
            }
        }
        let unstage = |s: &Option<Staging>| {
            if let Some(s) = s {
                s.remove();
            }
        };
        // createRuntime, then prestart: the VM runs (their state's pid is QEMU's), the container is not
        // created yet.
        let state = hooks::state_json(&c.hook_spec, &req.id, "creating", host_pid, &req.bundle);
        for (point, list) in [("createRuntime", &c.hooks.create_runtime), ("prestart", &c.hooks.prestart)] {
            if let Err(e) = hooks::run_all(point, list, &state).await {
                unstage(&restore_staging);
                return Err((TaskError::precondition(e.to_string()), mounts));
            }
        }
        let (sandbox_id, sandbox_namespaces) = match &c.role {
            spec::PodRole::Own => (String::new(), vec![]),
            spec::PodRole::Sandbox(s) => (s.clone(), vec![]),
            spec::PodRole::Container(s) => (s.clone(), c.adapted.dropped_namespace_paths.clone()),
        };
        let creq = ag::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: c.adapted.spec,
            rootfs: format!("{GUEST_SHARED}/{}/rootfs", req.id),
            for_restore: restore,
            sandbox_id,
            sandbox_namespaces,
            ..Default::default()
        };
        let guest_pid = match agent.call_default("CreateContainer", |cl, ctx| async move { cl.create_container(ctx, &creq).await }).await {
            Ok(r) => r.pid,
            Err(e) => {
                unstage(&restore_staging);
                return Err((agent_err(e), mounts));
            }
        };
        let mut init = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        init.guest_pid = guest_pid;
        init.start_io(&agent, &req.id, "");
        Ok(TaskState {
            id: req.id.clone(),
            bundle: c.bundle,
            role: c.role,
            released: false,
            agent,
            init,
            execs: HashMap::new(),
            mounts,
            shared,
            host_pid,
            restore_staging,
            deadline_s: c.deadline_s,
            open_tcp: c.open_tcp,
            oom_seen: Default::default(),
            restore_pending: restore,
            checkpointing: tokio::sync::watch::Sender::new(false),
            vm_gone: None,
            guest_mem_mib,
            meter: Default::default(),
            hooks: c.hooks,
            hook_spec: c.hook_spec,
        })
    }

    pub(crate) async fn task_create(&self, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        let parsed = parse_create(&req)?;
        {
            let mut g = self.state.lock().await;
            g.used = true;
            let mut creating = self.creating_lock();
            if g.tasks.contains_key(&req.id) || creating.contains_key(&req.id) {
                return Err(TaskError::exists(format!("task {} exists already", req.id)));
            }
            match &parsed.role {
                spec::PodRole::Container(sid) => match &g.vm {
                    Some(vm) if vm.pod && &vm.id == sid => {
                        if let Some(why) = g.tasks.values().find_map(|t| t.vm_gone.clone()) {
                            return Err(TaskError::vm_gone(format!("container {}: the VM of pod {sid} is gone ({why})", req.id)));
                        }
                    }
                    _ => {
                        return Err(TaskError::precondition(format!(
                            "container {}: its pod's sandbox {sid} does not run in this shim (was it stopped?)",
                            req.id
                        )))
                    }
                },
                _ if g.vm.is_some() || !g.tasks.is_empty() || !creating.is_empty() => {
                    return Err(TaskError::exists(format!("this shim already runs a VM; {} cannot be added (only a pod's containers share one)", req.id)));
                }
                _ => {}
            }
            creating.insert(req.id.clone(), req.clone());
        }
        info!(id = %req.id, bundle = %req.bundle, role = ?parsed.role, "create");
        // Its own task, without the state lock: the boot (and a restore's image staging) finishes or
        // cleans up even if the caller goes away, and State answers meanwhile.
        let me = self.clone();
        let r2 = req.clone();
        let created = tokio::spawn(async move {
            let joins = matches!(parsed.role, spec::PodRole::Container(_));
            let r = if joins {
                me.create_in_pod(&r2, parsed).await.map(|st| (None, st))
            } else {
                me.create_with_vm(&r2, parsed).await.map(|(vm, st)| (Some(vm), st))
            };
            let mut g = me.state.lock().await;
            me.creating_lock().remove(&r2.id);
            // The pod's VM stopped while this container was made (its last task was deleted): the
            // container went with it.
            let r = match r {
                Ok((None, st)) if g.vm.is_none() => {
                    st.mounts.teardown();
                    Err(TaskError::precondition(format!("container {}: its pod's VM stopped while it was created", r2.id)))
                }
                r => r,
            };
            r.map(|(vm, st)| {
                let pid = st.host_pid;
                let gone = vm.as_ref().map(|v| v.sandbox.gone.clone());
                if let Some(vm) = vm {
                    g.vm = Some(vm);
                }
                g.tasks.insert(st.id.clone(), st);
                // Queued with the task's creation (before any event of its start), even if the
                // caller has gone.
                me.events.queue(
                    TASK_CREATE_EVENT_TOPIC,
                    Box::new(TaskCreate {
                        container_id: r2.id.clone(),
                        bundle: r2.bundle.clone(),
                        rootfs: r2.rootfs.clone(),
                        io: Some(TaskIO {
                            stdin: r2.stdin.clone(),
                            stdout: r2.stdout.clone(),
                            stderr: r2.stderr.clone(),
                            terminal: r2.terminal,
                            ..Default::default()
                        })
                        .into(),
                        checkpoint: r2.checkpoint.clone(),
                        pid,
                        ..Default::default()
                    }),
                );
                (pid, gone)
            })
        })
        .await
        .map_err(|e| TaskError::internal(format!("create task failed: {e}")))?;
        let (pid, gone) = created?;
        if let Some(gone) = gone {
            self.spawn_vm_watch(gone);
        }
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }
}

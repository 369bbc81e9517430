//! Checkpoint of a running or paused task: the checks, CRIU's dump in the guest into a pinned staging
//! directory, the images copied out without trusting the guest, the report and CRIU's log.
use std::{path::PathBuf, time::Duration};

use agent_client::agent as ag;
use containerd_shim::{api::*, protos::ttrpc};
use tracing::{info, warn};

use crate::{
    checkpoint::{self, report::*, Staging, CHECKPOINT_DIR},
    error::TaskError,
    process::*,
    runtime::*,
    safefs::Dir,
};

impl TaskService {
    /// The checkpoint: claims the task once its checks passed (the claim is given back when the
    /// checkpoint ends, however it ends).
    pub(crate) async fn checkpoint_inner(&self, req: CheckpointTaskRequest, request_deadline: Option<Duration>) -> ttrpc::Result<Empty> {
        let opts = checkpoint::parse_options(req.options.as_ref())?;
        let (_claim, agent, cid, paused, bundle, shared, deadline_s, n, max, open_tcp) = {
            let mut guard = self.state.lock().await;
            let g = &mut *guard;
            g.checkpoints += 1;
            let n = g.checkpoints;
            let st = g.tasks.get_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let status = st.init.status;
            checkpointable(&st.id, status, st.restore_pending)?;
            if let Some(why) = &st.vm_gone {
                return Err(TaskError::vm_gone(format!("task {}: the VM is gone ({why})", st.id)));
            }
            let claim = CheckpointClaim::take(st).ok_or_else(|| TaskError::precondition(format!("task {} is being checkpointed already", st.id)))?;
            (
                claim,
                st.agent.clone(),
                st.id.clone(),
                status == PStatus::Paused,
                st.bundle.clone(),
                st.shared.clone(),
                st.deadline_s,
                n,
                max_image_bytes(st.guest_mem_mib),
                st.open_tcp,
            )
        };
        let (deadline_s, deadline_from) = checkpoint::effective_deadline(deadline_s, request_deadline);
        let target = PathBuf::from(if opts.image_path.is_empty() { &req.path } else { &opts.image_path });
        checkpoint::check_target_dir(&target)?;
        // Pinned before the guest writes there: later swaps of the name cannot redirect the host.
        let staging = Staging::for_checkpoint(&shared, n).map_err(|e| TaskError::internal(format!("checkpoint of {cid}: staging directory: {e}")))?;
        let work = format!("{GUEST_WORK}/checkpoint-{n}");
        let r = ag::CheckpointContainerRequest {
            container_id: cid.clone(),
            image_path: format!("{GUEST_SHARED}/{CHECKPOINT_DIR}/{n}"),
            work_path: work.clone(),
            leave_running: !opts.exit,
            tcp_established: opts.open_tcp || open_tcp,
            external_unix_sockets: opts.external_unix_sockets,
            shell_job: opts.terminal,
            file_locks: opts.file_locks,
            empty_namespaces: opts.empty_namespaces.clone(),
            already_frozen: paused,
            deadline_s: deadline_s as u32,
            ..Default::default()
        };
        info!(cid, n, paused, exit = opts.exit, target = %target.display(), deadline_s, deadline_from, "checkpoint");
        let started = std::time::Instant::now();
        let result =
            agent.call("CheckpointContainer", Duration::from_secs(deadline_s) + agent_client::DEADLINE_SLACK, |c, ctx| async move { c.checkpoint_container(ctx, &r).await }).await;
        let log = fetch_guest_log(&agent, &format!("{work}/dump.log"), &bundle, &format!("dump-{n}.log")).await;
        rotate_dump_files(&bundle, n);
        let outcome = match result {
            Err(e) => {
                staging.remove();
                Err(failed_in_guest(e, format!("checkpoint of {cid} failed"), &log))
            }
            Ok(resp) => {
                // Blocking file I/O of up to gigabytes: off the async workers.
                let (staging, target) = (staging, target.clone());
                let copied = tokio::task::spawn_blocking(move || {
                    let r = checkpoint::copy_images(&staging.dir, &target, checkpoint::image_limits(max));
                    staging.remove();
                    r
                })
                .await
                .unwrap_or_else(|e| Err(crate::safefs::SafeFsError::Io { path: String::new(), source: std::io::Error::other(e.to_string()) }));
                copied
                    .map(|copied| (copied, resp.stats))
                    .map_err(|e| TaskError::internal(format!("copying checkpoint images of {cid} from the guest: {e}; CRIU log: {log}")))
            }
        };
        match outcome {
            Ok((copied, agent_stats)) => {
                let mut report = serde_json::Map::new();
                report.insert("checkpoint_s".into(), started.elapsed().as_secs_f64().into());
                report.insert("image_bytes".into(), copied.bytes.into());
                report.insert("image_files".into(), copied.files.into());
                add_guest_figures(&mut report, &agent_stats);
                if let Some(raw) = add_criu_stats(&agent, &mut report, format!("{work}/stats-dump")).await {
                    if let Err(e) = std::fs::write(target.join("stats-dump"), raw) {
                        warn!(error = %e, "writing stats-dump beside the images");
                    }
                }
                write_report(&target.join(STATS_FILE), &report);
                write_report(&bundle.join(format!("criu-dump-{n}.stats.json")), &report);
                info!(cid, n, log, stats = %serde_json::Value::Object(report), "checkpoint written");
                Ok(Empty::new())
            }
            Err(e) => {
                checkpoint::empty_host_dir(&Dir::open_host(&target).map_err(|e2| TaskError::internal(format!("{e:?}; emptying {}: {e2}", target.display())))?);
                Err(e)
            }
        }
    }

    pub(crate) async fn task_checkpoint(&self, req: CheckpointTaskRequest, request_deadline: Option<Duration>) -> ttrpc::Result<Empty> {
        // Its own task: should ttrpc drop this call at the caller's deadline, the cleanup still runs.
        let me = self.clone();
        tokio::spawn(async move { me.checkpoint_inner(req, request_deadline).await })
            .await
            .map_err(|e| TaskError::internal(format!("checkpoint task failed: {e}")))?
    }
}

//! The restore of a task created from a checkpoint, in its VM: CRIU's restore through the agent, its
//! report, and CRIU's log on failure.
use std::{path::Path, time::Duration};

use agent_client::{agent as ag, AgentClient};
use containerd_shim::protos::ttrpc;
use tracing::info;

use crate::{
    checkpoint::{self, report::*, Staging},
    runtime::*,
};

impl TaskService {
    /// The restore of a task created from a checkpoint (its Start): CRIU restore in the guest from the
    /// staged images; the CRIU log comes back on failure. Returns the guest pid.
    pub(crate) async fn restore_init(
        &self,
        agent: &AgentClient,
        cid: &str,
        deadline: (u64, &'static str),
        bundle: &Path,
        staging: Option<Staging>,
    ) -> ttrpc::Result<u32> {
        let (deadline_s, deadline_from) = deadline;
        // Per container: a pod's containers may restore at once.
        let work = format!("{GUEST_WORK}/restore-{cid}");
        let r = ag::RestoreContainerRequest {
            container_id: cid.to_string(),
            image_path: format!("{GUEST_SHARED}/{}", checkpoint::restore_dir(cid)),
            work_path: work.clone(),
            deadline_s: deadline_s as u32,
            ..Default::default()
        };
        let timeout = Duration::from_secs(deadline_s) + agent_client::DEADLINE_SLACK;
        info!(cid, deadline_s, deadline_from, "restore");
        let started = std::time::Instant::now();
        let result = agent.call("RestoreContainer", timeout, |c, ctx| async move { c.restore_container(ctx, &r).await }).await;
        let restore_s = started.elapsed().as_secs_f64();
        match result {
            Ok(r) => {
                let mut report = serde_json::Map::new();
                report.insert("restore_s".into(), restore_s.into());
                add_criu_stats(agent, &mut report, format!("{work}/stats-restore")).await;
                write_report(&bundle.join("criu-restore.stats.json"), &report);
                info!(cid, restore_s, stats = %serde_json::Value::Object(report), "restored");
                if let Some(s) = staging {
                    s.remove();
                }
                Ok(r.pid)
            }
            Err(e) => {
                if let Some(s) = staging {
                    s.remove();
                }
                let log = fetch_guest_log(agent, &format!("{work}/restore.log"), bundle, "restore.log").await;
                Err(failed_in_guest(e, format!("restore of {cid} failed"), &log))
            }
        }
    }
}

//! containerd's task service (API v2): each call decoded, handed to the runtime in one call, and its
//! answer encoded. One VM per shim, holding one container (its own VM) or every container of a
//! Kubernetes pod (the VM its sandbox container booted). No lock is taken and no agent is called here.
use async_trait::async_trait;
use containerd_shim::{
    api::*,
    protos::{
        shim_async::Task,
        ttrpc::{self, r#async::TtrpcContext},
    },
};

use crate::runtime::request_deadline;
pub use crate::runtime::TaskService;

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        self.task_create(req).await
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        self.task_start(req, request_deadline(ctx)).await
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        self.task_state(req).await
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        self.task_wait(req).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.task_kill(req).await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.task_exec(req).await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.task_resize_pty(req).await
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.task_close_io(req).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.pause_resume(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.pause_resume(&req.id, false).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.task_pids(req).await
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.task_stats(req).await
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.task_update(req).await
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        self.task_connect(req).await
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        self.task_delete(req).await
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.task_shutdown(req).await
    }

    async fn checkpoint(&self, ctx: &TtrpcContext, req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        self.task_checkpoint(req, request_deadline(ctx)).await
    }
}

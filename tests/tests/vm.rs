//! Integration tests against a real QEMU guest: criu-bridge as PID 1, runc and CRIU inside.
//! Each test boots its own VM (about 10 s under TCG) and checks that nothing is left afterwards.
use std::time::Duration;

use agent_client::agent::*;
use kata_rs_tests::*;
use vmm::qmp::VmEvent;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_stdout_and_stderr_come_back_byte_for_byte() {
    let sb = boot("stdio").await;
    let (host, guest) = prepare_rootfs(&sb, "c1");
    // 1 MiB of every byte value in a pseudo-random order: binary-safe, no line structure.
    let mut data = Vec::with_capacity(1 << 20);
    let mut x: u32 = 12345;
    while data.len() < 1 << 20 {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        data.push((x >> 16) as u8);
    }
    std::fs::write(host.join("data.bin"), &data).unwrap();
    let req = CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: oci_spec(&["sh", "-c", "cat /data.bin; echo to-stderr >&2; exit 5"]),
        rootfs: guest,
        ..Default::default()
    };
    sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap();
    let req = ContainerRequest { container_id: "c1".into(), ..Default::default() };
    let pid = sb.agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &req).await }).await.unwrap().pid;
    assert!(pid > 1, "init pid {pid}");
    let (out, err) = tokio::join!(read_to_end(&sb.agent, "c1", "", false, T), read_to_end(&sb.agent, "c1", "", true, T));
    let out = out.unwrap();
    assert_eq!(out.len(), data.len(), "stdout length");
    assert!(out == data, "stdout differs from the file the container printed");
    assert_eq!(err.unwrap(), b"to-stderr\n");
    assert_eq!(wait_process(&sb.agent, "c1", "", T).await, 5);
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_processes_and_exit_statuses_come_back() {
    let sb = boot("signal").await;
    run_container(&sb, "c1", &["sh", "-c", "trap 'exit 7' TERM; echo ready; while :; do sleep 0.1; done"]).await;
    // The trap is installed once "ready" is printed.
    let req = ReadStreamRequest { container_id: "c1".into(), max_len: 64, ..Default::default() };
    let first = sb.agent.call("ReadStdout", T, |c, ctx| async move { c.read_stdout(ctx, &req).await }).await.unwrap();
    assert_eq!(first.data, b"ready\n");

    // An exec'd process: its own exit status, and SIGKILL -> 137.
    let req = ExecProcessRequest { container_id: "c1".into(), exec_id: "e1".into(), process: oci_process(&["sh", "-c", "exit 3"]), ..Default::default() };
    sb.agent.call_default("ExecProcess", |c, ctx| async move { c.exec_process(ctx, &req).await }).await.unwrap();
    assert_eq!(wait_process(&sb.agent, "c1", "e1", T).await, 3);
    let req = ExecProcessRequest { container_id: "c1".into(), exec_id: "e2".into(), process: oci_process(&["sleep", "1000"]), ..Default::default() };
    sb.agent.call_default("ExecProcess", |c, ctx| async move { c.exec_process(ctx, &req).await }).await.unwrap();
    let req = SignalProcessRequest { container_id: "c1".into(), exec_id: "e2".into(), signal: 9, ..Default::default() };
    sb.agent.call_default("SignalProcess", |c, ctx| async move { c.signal_process(ctx, &req).await }).await.unwrap();
    assert_eq!(wait_process(&sb.agent, "c1", "e2", T).await, 137);

    // The init process: SIGTERM runs its trap.
    let req = SignalProcessRequest { container_id: "c1".into(), signal: 15, ..Default::default() };
    sb.agent.call_default("SignalProcess", |c, ctx| async move { c.signal_process(ctx, &req).await }).await.unwrap();
    assert_eq!(wait_process(&sb.agent, "c1", "", T).await, 7);

    // Signalling an exited process (an exec, the init) is NotFound, as runc's shim answers: containerd
    // takes it as stopped.
    for exec_id in ["e1", ""] {
        let req = SignalProcessRequest { container_id: "c1".into(), exec_id: exec_id.into(), signal: 9, ..Default::default() };
        let e = sb.agent.call_default("SignalProcess", |c, ctx| async move { c.signal_process(ctx, &req).await }).await.unwrap_err();
        assert!(e.to_string().contains("already finished") && e.to_string().contains("NOT_FOUND"), "{exec_id:?}: {e}");
    }
    let req = ContainerRequest { container_id: "c1".into(), ..Default::default() };
    sb.agent.call_default("RemoveContainer", |c, ctx| async move { c.remove_container(ctx, &req).await }).await.unwrap();
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_counter_and_resume_continues_it() {
    let sb = boot("pause").await;
    let host = run_container(&sb, "c1", &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"]).await;
    let count = host.join("count");
    wait_counter(&count, 5, T).await;
    let req = ContainerRequest { container_id: "c1".into(), ..Default::default() };
    let r2 = req.clone();
    sb.agent.call_default("PauseContainer", |c, ctx| async move { c.pause_container(ctx, &r2).await }).await.unwrap();
    // Its content, not a number: frozen between `echo`'s truncation and its write, the file stays
    // empty for the whole pause.
    let frozen = std::fs::read_to_string(&count).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::read_to_string(&count).unwrap(), frozen, "the counter advanced while paused");
    let frozen: u64 = frozen.trim().parse().unwrap_or(0);
    let pids = sb.agent.call_default("ListProcesses", |c, ctx| { let r = req.clone(); async move { c.list_processes(ctx, &r).await } }).await.unwrap().pids;
    assert!(!pids.is_empty(), "runc ps lists the container's processes");
    let r2 = req.clone();
    sb.agent.call_default("ResumeContainer", |c, ctx| async move { c.resume_container(ctx, &r2).await }).await.unwrap();
    wait_counter(&count, frozen + 5, T).await;
    let stats = sb.agent.call_default("StatsContainer", |c, ctx| { let r = req.clone(); async move { c.stats_container(ctx, &r).await } }).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stats.runc_stats).expect("runc stats are JSON");
    assert!(v["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0, "memory usage in stats: {v}");
    assert!(v["data"]["pids"]["current"].as_u64().unwrap_or(0) >= 1, "pids in stats: {v}");
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_stop_cont_and_quit() {
    let sb = boot("qmp").await;
    // A guest-side counter, visible on the host through virtio-fs, shows whether the guest runs.
    let host = run_container(&sb, "c1", &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"]).await;
    let count = host.join("count");
    wait_counter(&count, 3, T).await;
    let qmp = sb.vm.qmp();
    let mut events = qmp.subscribe();
    assert_eq!(qmp.query_status().await.unwrap(), (true, "running".to_string()));
    qmp.stop().await.unwrap();
    assert_eq!(next_event(&mut events).await, VmEvent::Stop);
    assert_eq!(qmp.query_status().await.unwrap(), (false, "paused".to_string()));
    // Its content, not a number (the guest may have stopped between `echo`'s truncation and its write).
    let frozen = std::fs::read_to_string(&count).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::read_to_string(&count).unwrap(), frozen, "the guest ran while QEMU was stopped");
    let frozen: u64 = frozen.trim().parse().unwrap_or(0);
    qmp.cont().await.unwrap();
    assert_eq!(next_event(&mut events).await, VmEvent::Resume);
    assert_eq!(qmp.query_status().await.unwrap(), (true, "running".to_string()));
    wait_counter(&count, frozen + 5, T).await;
    // quit: QEMU reports SHUTDOWN and exits; teardown reaps it and the daemons.
    stop_and_assert_clean_after_quit(sb, events).await;
}

async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<VmEvent>) -> VmEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no QMP event within 10 s").unwrap()
}

async fn stop_and_assert_clean_after_quit(sb: kata_rs_shim::Sandbox, mut events: tokio::sync::broadcast::Receiver<VmEvent>) {
    sb.vm.qmp().quit().await.unwrap();
    match next_event(&mut events).await {
        VmEvent::Shutdown { guest, reason } => {
            assert!(!guest);
            assert_eq!(reason, "host-qmp-quit");
        }
        other => panic!("expected SHUTDOWN, got {other:?}"),
    }
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criu_check_runs_in_the_guest_and_file_reads_stay_in_the_agents_directories() {
    let sb = boot("criu").await;
    let r = sb.agent.call("CriuCheck", T, |c, ctx| async move { c.criu_check(ctx, &CriuCheckRequest::new()).await }).await.unwrap();
    assert_eq!(r.exit_code, 0, "criu check failed: {}", r.output);
    assert!(r.output.contains("Looks good"), "{}", r.output);
    assert!(r.criu_version.contains("Version"), "{}", r.criu_version);
    // The readiness probe's Check does not run the tools; asked for, their versions come back.
    let req = agent_client::agent::CheckRequest { tool_versions: true, ..Default::default() };
    let r = sb.agent.call("Check", T, |c, ctx| async move { c.check(ctx, &req).await }).await.unwrap();
    assert!(r.runc_version.starts_with("runc version"), "{}", r.runc_version);
    assert!(r.criu_version.contains("Version"), "{}", r.criu_version);
    // The agent refuses to read files outside its own directories.
    let req = ReadFileTailRequest { path: "/etc/passwd".into(), max_bytes: 100, ..Default::default() };
    let e = sb.agent.call_default("ReadFileTail", |c, ctx| async move { c.read_file_tail(ctx, &req).await }).await.unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let sb = boot("errors").await;
    let req = ContainerRequest { container_id: "nope".into(), ..Default::default() };
    let e = sb.agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &req).await }).await.unwrap_err();
    assert!(e.to_string().contains("container nope not found"), "{e}");
    let req = CreateContainerRequest { container_id: "../x".into(), oci_spec: oci_spec(&["true"]), rootfs: "/".into(), ..Default::default() };
    let e = sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap_err();
    assert!(e.to_string().contains("must be 1-128"), "{e}");
    let (_, guest) = prepare_rootfs(&sb, "c2");
    let req = CreateContainerRequest { container_id: "c2".into(), oci_spec: oci_spec(&["/no/such/binary"]), rootfs: guest, ..Default::default() };
    let e = sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap_err();
    assert!(e.to_string().contains("runc create failed: unable to start container process") && e.to_string().contains("no such file"), "{e}");
    assert_eq!(e.to_string().matches("runc create failed").count(), 1, "{e}");
    stop_and_assert_clean(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kernel_is_a_one_line_error_naming_the_file() {
    let mut c = test_config();
    c.hypervisor.kernel = "/nonexistent/vmlinux".into();
    let e = kata_rs_shim::Sandbox::start(&c, &unique_id("nokernel")).await.err().expect("must fail").to_string();
    assert!(e.contains("/nonexistent/vmlinux") && e.contains("make guest-image"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

/// `check` passes on this host and says which accelerator it chose; TCG (what `auto` falls back to
/// where KVM cannot run the guest) comes with the warning that it is not a security boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_warns_when_tcg_is_the_accelerator() {
    init_logging();
    let mut config = test_config();
    config.hypervisor.accel = vmm::AccelSetting::Auto;
    let items = kata_rs_shim::check::run(&config, |_| {}).await;
    assert!(items.iter().all(|i| i.ok), "check: {:#?}", items.iter().map(|i| i.to_string()).collect::<Vec<_>>());
    let accel = items.iter().find(|i| i.name == "accel").expect("an accel line");
    if accel.detail.starts_with("tcg") {
        assert!(accel.detail.contains("not a security boundary"), "{}", accel.detail);
    } else {
        assert!(accel.detail.starts_with("kvm") && !accel.detail.contains("not a security boundary"), "{}", accel.detail);
    }
}

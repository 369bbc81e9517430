//! `make bench`: prints `RESULT name=value unit` lines. Never fails on a time.
use std::time::{Duration, Instant};

use agent_client::agent::CheckRequest;
use kata_rs_tests::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The median of the values that are numbers (NaN, a figure that was missing, when none is).
fn median(v: Vec<f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn result(name: &str, value: f64, unit: &str, note: &str) {
    if note.is_empty() {
        println!("RESULT {name}={value:.3} {unit}");
    } else {
        println!("RESULT {name}={value:.3} {unit}  # {note}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The network and pod figures run in namespaces of their own (this binary again, under unshare).
    if std::env::args().nth(1).as_deref() == Some("network") && kata_rs_tests::netns::inside() {
        kata_rs_tests::netns::setup_inside();
        network_figures().await;
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("pods") && kata_rs_tests::netns::inside() {
        kata_rs_tests::netns::setup_inside();
        // The CRI client blocks on a runtime of its own: off this one's workers.
        std::thread::spawn(pod_figures).join().expect("pod figures");
        return;
    }
    // The runc baseline's CRIU (scripts/host-criu.sh): first on containerd's PATH, so runc finds it.
    if let Some(d) = std::env::var_os("KATA_RS_HOST_CRIU") {
        let mut paths = vec![std::path::PathBuf::from(d)];
        paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
    }
    let boots: usize = std::env::var("KATA_RS_BENCH_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let me = std::process::id();
    let rss_before = rss_kib(me);
    let mut times = Vec::new();
    let (mut uptimes, mut module_loads) = (Vec::new(), Vec::new());
    let mut last = None;
    for i in 0..boots {
        let t = Instant::now();
        let sb = boot("bench").await;
        times.push(t.elapsed().as_secs_f64());
        let (uptime, modules) = guest_phases(&sb.vm.console_log());
        if std::env::var_os("KATA_RS_BENCH_CONSOLE").is_some() {
            eprintln!("--- console of boot {}\n{}", i + 1, std::fs::read_to_string(sb.vm.console_log()).unwrap_or_default());
        }
        uptimes.push(uptime);
        module_loads.push(modules);
        eprintln!(
            "boot {}: {:.2} s (QEMU launch to agent answer {:.2} s, accel {}; guest: agent listening at uptime {uptime:.2} s, module loads {modules:.2} s)",
            i + 1,
            times[i],
            sb.boot_time.as_secs_f64(),
            sb.vm.accel
        );
        if i + 1 < boots {
            sb.stop(None).await;
        } else {
            last = Some(sb);
        }
    }
    let sb = last.expect("at least one boot");
    result("vm_boot_to_agent_ready_s", median(times.clone()), "s", &format!("median of {boots}, accel {}, includes VM start and agent connect", sb.vm.accel));
    result("vm_guest_uptime_at_agent_listen_s", median(uptimes), "s", "phase: guest kernel start to the agent listening (guest clock, from its ready line)");
    result("vm_guest_module_load_s", median(module_loads), "s", "phase: the agent's kernel module loads, part of the above");
    if std::env::var("KATA_RS_BENCH_ONLY").as_deref() == Ok("boot") {
        sb.stop(None).await;
        return;
    }

    // Agent round trips: Check (answered from the agent's cache, so it measures the channel).
    let n = 500;
    let mut rtt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sb.agent.call("Check", Duration::from_secs(10), |c, ctx| async move { c.check(ctx, &CheckRequest::new()).await }).await.unwrap();
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
    }
    result("agent_rpc_roundtrip_us", median(rtt.clone()), "us", &format!("median of {n} Check calls over hybrid vsock"));
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    result("agent_rpc_roundtrip_p99_us", rtt[n * 99 / 100], "us", "");

    let rss_with = rss_kib(me);
    result("vm_owner_rss_before_vm_kib", rss_before as f64, "KiB", "baseline: this process before any VM");
    result("vm_owner_rss_kib", rss_with as f64, "KiB", "the same process owning one running VM and its agent connection");
    let pids = sb.vm.pids();
    // Vm::pids(): QEMU first, then the helper daemons. Shared (memfd) guest pages count in each RSS.
    result("qemu_rss_kib", rss_kib(pids[0]) as f64, "KiB", &format!("QEMU with a {} MiB guest (guest pages touched so far included)", test_config().hypervisor.memory_mib));
    let helpers: u64 = pids[1..].iter().map(|&p| rss_kib(p)).sum();
    result("vm_helper_daemons_rss_kib", helpers as f64, "KiB", "vhost-device-vsock + virtiofsd (they map guest memory: shared pages included)");
    sb.stop(None).await;

    transfer_figures();
    containerd_figures().await;
    let st = kata_rs_tests::netns::run_isolated(&["network"]);
    if !st.success() {
        println!("# network figures incomplete: their isolated run ended with {st}");
    }
    // Pods need containerd 2.x's CRI (make bench unpacks Debian sid's containerd for them).
    match std::env::var_os("KATA_RS_BENCH_CRI_CONTAINERD") {
        Some(dir) => {
            let before = std::env::var_os("KATA_RS_CONTAINERD_BIN_DIR");
            std::env::set_var("KATA_RS_CONTAINERD_BIN_DIR", dir);
            let st = kata_rs_tests::netns::run_isolated(&["pods"]);
            if !st.success() {
                println!("# pod figures incomplete: their isolated run ended with {st}");
            }
            match before {
                Some(b) => std::env::set_var("KATA_RS_CONTAINERD_BIN_DIR", b),
                None => std::env::remove_var("KATA_RS_CONTAINERD_BIN_DIR"),
            }
        }
        None => println!("# pod figures skipped: KATA_RS_BENCH_CRI_CONTAINERD (a containerd 2.x bin directory) is not set"),
    }
    load_figures();
}

/// The guest's own boot phases from its ready line on the console (`uptime=… modules=…`); NaN when absent.
fn guest_phases(console: &std::path::Path) -> (f64, f64) {
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let line = log.lines().rev().find(|l| l.contains(kata_rs_shim::sandbox::AGENT_READY_MARKER)).unwrap_or("");
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    (field("uptime="), field("modules="))
}

/// With CNI (bridge, host-local) in a network namespace of the bench's own: `ctr run -d --cni` of an
/// httpd until the host gets its page, and checkpoint/restore of that container in a pod-like
/// namespace (CNI ADD beforehand, `--with-ns`), kata-rs and runc in the same containerd.
async fn network_figures() {
    use kata_rs_tests::{
        containerd::{Containerd, RUNTIME},
        netns::{allocated_addresses, cni_add, cni_del, http_get},
    };
    let c = Containerd::start();
    let limit = Duration::from_secs(300);
    let web = "mkdir -p /www && echo bench-web > /www/index.html && exec httpd -f -p 80 -h /www";
    for (name, runtime) in [("kata_rs", RUNTIME), ("runc_v2", "io.containerd.runc.v2")] {
        let mut times = Vec::new();
        for i in 0..3 {
            let id = format!("w-{name}-{i}");
            let before = allocated_addresses();
            let t = Instant::now();
            c.run_detached_with(runtime, &id, &["--cni"], &["sh", "-c", web]);
            let Some(ip) = allocated_addresses().into_iter().find(|a| !before.contains(a)) else {
                println!("# ctr_run_cni_to_http_s[{name}] not measured: CNI gave no address");
                c.kill_and_remove(&id);
                break;
            };
            let body = http_get(&format!("{ip}:80"), limit);
            times.push(t.elapsed().as_secs_f64());
            assert!(body.contains("bench-web"), "{body}");
            c.kill_and_remove(&id);
        }
        if !times.is_empty() {
            let n = times.len();
            result(&format!("ctr_run_cni_to_http_s[{name}]"), median(times), "s", &format!("median of {n}: ctr run -d --cni (busybox httpd) until the host has the page"));
        }
    }
    for (name, runtime) in [("kata_rs", RUNTIME), ("runc_v2", "io.containerd.runc.v2")] {
        let tag = format!("[{name},network]");
        let ns = format!("kr-bench-{name}");
        let netns = format!("/run/netns/{ns}");
        let st = std::process::Command::new("ip").args(["netns", "add", &ns]).status().unwrap();
        assert!(st.success());
        let ip = cni_add(&netns, &ns);
        let id = format!("nw-{name}");
        c.run_detached_with(runtime, &id, &["--with-ns", &format!("network:{netns}")], &["sh", "-c", web]);
        http_get(&format!("{ip}:80"), limit);
        let image = format!("kata-rs-bench/{id}:1");
        let t = Instant::now();
        let o = c.ctr(&["containers", "checkpoint", "--task", "--rw", "--image", &id, &image]);
        let checkpoint_s = t.elapsed().as_secs_f64();
        if !o.status.success() {
            let e = String::from_utf8_lossy(&o.stderr);
            let why = e.lines().find(|l| l.contains("Error (")).or(e.lines().next()).unwrap_or("").trim().to_string();
            println!("# network checkpoint figures {tag} skipped: the checkpoint failed: {why}{}", criu_errors(&e));
            c.kill_and_remove(&id);
        } else {
            result(&format!("checkpoint_s{tag}"), checkpoint_s, "s", "ctr containers checkpoint --task --rw --image of an httpd with a CNI interface");
            c.kill_and_remove(&id);
            let rid = format!("{id}-r");
            let t = Instant::now();
            let o = c.ctr(&["containers", "restore", "--live", "--rw", &rid, &image]);
            if o.status.success() {
                result(&format!("restore_s{tag}"), t.elapsed().as_secs_f64(), "s", "ctr containers restore --live --rw into the same namespace");
                http_get(&format!("{ip}:80"), limit);
                result(&format!("restore_to_http_s{tag}"), t.elapsed().as_secs_f64(), "s", "restore until the host has the page again");
                c.kill_and_remove(&rid);
            } else {
                println!("# restore_s{tag} not measured: {}", String::from_utf8_lossy(&o.stderr).trim());
                let _ = c.ctr(&["container", "rm", &rid]);
            }
            let _ = c.ctr(&["images", "rm", "--sync", &image]);
        }
        cni_del(&netns, &ns);
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
    }
}

/// Through containerd 2.x's CRI (the kubelet's calls), with CNI: RunPodSandbox, CreateContainer and
/// StartContainer of one busybox container, until CRI reports the container running; kata-rs (a VM
/// per pod) and runc in the same containerd, each pod removed before the next.
fn pod_figures() {
    use kata_rs_tests::{
        containerd::{Containerd, IMAGE, KATA_HANDLER, RUNC_HANDLER},
        cri::{ContainerSpec, ContainerState, PodSpec},
    };
    let c = Containerd::start_cri();
    let cri = c.cri();
    for (name, handler) in [("kata_rs", KATA_HANDLER), ("runc_v2", RUNC_HANDLER)] {
        let mut times = Vec::new();
        for i in 0..3 {
            let logs = c.dir.join(format!("logs-{name}-{i}"));
            std::fs::create_dir_all(&logs).unwrap();
            let t = Instant::now();
            let run = || -> anyhow::Result<String> {
                let pod = cri.run_pod_sandbox(&PodSpec::new(&format!("bench-{name}-{i}"), handler, &logs))?;
                let id = cri.create_container(&pod, &ContainerSpec::new("app", IMAGE, &["sleep", "100000"]))?;
                cri.start_container(&id)?;
                cri.wait_container_state(&id, ContainerState::ContainerRunning, Duration::from_secs(300))?;
                Ok(pod)
            };
            match run() {
                Ok(pod) => {
                    times.push(t.elapsed().as_secs_f64());
                    let _ = cri.stop_pod_sandbox(&pod);
                    let _ = cri.remove_pod_sandbox(&pod);
                }
                Err(e) => {
                    println!("# pod_start_to_container_running_s[{name}] not measured: {e:#}");
                    break;
                }
            }
        }
        if !times.is_empty() {
            let n = times.len();
            result(
                &format!("pod_start_to_container_running_s[{name}]"),
                median(times),
                "s",
                &format!("median of {n}: CRI RunPodSandbox + CreateContainer + StartContainer until the container runs"),
            );
        }
    }
}

/// Copying 256 MiB of checkpoint images out of a tmpfs (as the shared directory is) to a directory on
/// disk (as containerd's is): the path-based walk kata-rs used before the guest was treated as hostile
/// (re-implemented here as the baseline: read_dir, symlink_metadata, open by path) and the copy through
/// pinned descriptors (openat2, fstat, bounds) it uses now. Same data, same run.
fn transfer_figures() {
    use kata_rs_shim::{checkpoint, safefs};
    use std::io::Write;
    let top = std::path::PathBuf::from(format!("/run/kata-rs-bench-transfer-{}", std::process::id()));
    let dst_top = std::env::temp_dir().join(format!("kata-rs-bench-transfer-{}", std::process::id()));
    let src = top.join("images");
    let _ = std::fs::remove_dir_all(&top);
    std::fs::create_dir_all(&src).unwrap();
    let mut f = std::fs::File::create(src.join("pages-1.img")).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..256 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    for i in 0..40 {
        std::fs::write(src.join(format!("core-{i}.img")), vec![1u8; 4096]).unwrap();
    }
    fn path_walk(src: &std::path::Path, dst: &std::path::Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert!(m.is_file());
            total += std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
        total
    }
    let reps = 3;
    let (mut before, mut after) = (vec![], vec![]);
    for i in 0..reps {
        for (k, times) in [(0, &mut before), (1, &mut after)] {
            let dst = dst_top.join(format!("{k}-{i}"));
            std::fs::create_dir_all(&dst).unwrap();
            let t = Instant::now();
            let bytes = if k == 0 {
                path_walk(&src, &dst)
            } else {
                let from = safefs::Dir::open_host(&src).unwrap();
                checkpoint::copy_images(&from, &dst, checkpoint::image_limits(3 << 30)).unwrap().bytes
            };
            let _ = std::fs::File::open(&dst).and_then(|d| d.sync_all());
            times.push(t.elapsed().as_secs_f64());
            assert_eq!(bytes, (256 << 20) + 40 * 4096);
            let _ = std::fs::remove_dir_all(&dst);
        }
    }
    result("image_copy_s[path_walk_before,256mib]", median(before), "s", "median of 3: the old path-based copy out of the shared dir (baseline, re-implemented here)");
    result("image_copy_s[pinned_fd_after,256mib]", median(after), "s", "median of 3: openat2/fstat/bounded copy through pinned descriptors (what the shim does now)");
    let _ = std::fs::remove_dir_all(&top);
    let _ = std::fs::remove_dir_all(&dst_top);
}

/// `ctr run --rm` until the container's output arrives, for kata-rs and runc in the same containerd.
async fn containerd_figures() {
    use kata_rs_tests::containerd::{Containerd, IMAGE, RUNTIME};
    use std::io::Read;
    let c = Containerd::start();
    let fifo = c.dir.join("fifo").display().to_string();
    let reps = 3;
    for (name, runtime) in [("kata_rs", RUNTIME), ("runc_v2", "io.containerd.runc.v2")] {
        let mut times = Vec::new();
        for i in 0..reps {
            let id = format!("b-{name}-{i}");
            let t = Instant::now();
            let mut child = std::process::Command::new(c.ctr_path())
                .args(["--address", &c.address, "run", "--rm", "--runtime", runtime, "--fifo-dir", &fifo, IMAGE, &id, "echo", "bench-output"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = child.stdout.take().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            let mut at = None;
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if at.is_none() && String::from_utf8_lossy(&seen).contains("bench-output") {
                    at = Some(t.elapsed().as_secs_f64());
                }
            }
            let st = child.wait_with_output().unwrap();
            match at {
                Some(s) => times.push(s),
                None => eprintln!("{name}: no output (exit {}): {}", st.status, String::from_utf8_lossy(&st.stderr)),
            }
        }
        if times.is_empty() {
            println!("# ctr_run_to_output_s[{name}] skipped: the runtime produced no output here");
        } else {
            let n = times.len();
            result(&format!("ctr_run_to_output_s[{name}]"), median(times), "s", &format!("median of {n}, ctr run --rm ... echo"));
        }
    }
    // The shim's own memory while it owns one running VM.
    c.run_detached("b-rss", &[], &["sleep", "1000"]);
    let shims = processes_mentioning(&format!("-address {}", c.address));
    if let Some((pid, _)) = shims.first() {
        result("shim_rss_kib", rss_kib(*pid) as f64, "KiB", "containerd-shim-kata-rs-v2 serving one running container (VM processes not included)");
    }
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "b-rss"]);
    c.wait_status("b-rss", "STOPPED", Duration::from_secs(60));
    c.ctr_ok(&["task", "rm", "b-rss"]);
    c.ctr_ok(&["container", "rm", "b-rss"]);
    checkpoint_figures(&c).await;
}

/// runc names CRIU's log in its error (`path= <file>: unknown`); its `Error` lines, read before the
/// bundle goes.
fn criu_errors(e: &str) -> String {
    let Some(p) = e.split("path= ").nth(1).and_then(|r| r.split(": ").next()) else { return String::new() };
    let text = std::fs::read_to_string(p.trim()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).take(5).collect();
    if lines.is_empty() { String::new() } else { format!("; CRIU: {}", lines.join(" | ")) }
}

/// Checkpoint tar blobs (holding inventory.img) in containerd's content store, with their sizes.
fn checkpoint_blobs(c: &kata_rs_tests::containerd::Containerd) -> Vec<(std::path::PathBuf, u64)> {
    c.content_blobs()
        .into_iter()
        .filter_map(|b| {
            let data = std::fs::read(&b).ok()?;
            tar_entries(&data).iter().any(|(n, _, _)| n.trim_start_matches("./") == "inventory.img").then(|| (b, data.len() as u64))
        })
        .collect()
}

fn report(c: &kata_rs_tests::containerd::Containerd, id: &str, file: &str) -> serde_json::Value {
    std::fs::read(c.bundle(id).join(file)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Checkpoint and restore through ctr, for a small and a 256 MiB container, kata-rs and runc (host CRIU).
async fn checkpoint_figures(c: &kata_rs_tests::containerd::Containerd) {
    use kata_rs_tests::containerd::RUNTIME;
    let limit = Duration::from_secs(600);
    let counter: &[&str] = &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"];
    for (size, cmd) in [("small", counter), ("256mib", &["/bin/memhog", "256"][..])] {
        for (name, runtime) in [("kata_rs", RUNTIME), ("runc_v2", "io.containerd.runc.v2")] {
            let tag = format!("[{name},{size}]");
            let id = format!("ck-{name}-{size}");
            c.run_detached_with(runtime, &id, &[], cmd);
            if size != "small" {
                wait_file(&c.rootfs(&id).join("fill"), limit, |s| s.ends_with('\n')).await;
            }
            wait_counter(&c.rootfs(&id).join("count"), 3, limit).await;
            let image = format!("kata-rs-bench/{id}:1");
            let before = checkpoint_blobs(c);
            let t = Instant::now();
            let o = c.ctr(&["containers", "checkpoint", "--task", "--rw", "--image", &id, &image]);
            let checkpoint_s = t.elapsed().as_secs_f64();
            let ok = o.status.success();
            if !ok {
                let e = String::from_utf8_lossy(&o.stderr);
                let why = e.lines().find(|l| l.contains("Error (")).or(e.lines().next()).unwrap_or("").trim().to_string();
                let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
                let criu = std::process::Command::new("criu").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()).unwrap_or_else(|_| "no criu".into());
                println!("# checkpoint figures {tag} skipped: the checkpoint failed on this host (kernel {kernel}, host {criu}): {why}{}", criu_errors(&e));
            } else {
                result(&format!("checkpoint_s{tag}"), checkpoint_s, "s", "ctr containers checkpoint --task --rw --image (pause, dump, copy, content store, resume)");
                if let Some((_, bytes)) = checkpoint_blobs(c).into_iter().find(|b| !before.contains(b)) {
                    result(&format!("image_bytes{tag}"), bytes as f64, "B", "the checkpoint tar in containerd's content store");
                }
                if name == "kata_rs" {
                    let r = report(c, &id, "criu-dump-1.stats.json");
                    if let (Some(shim), Some(guest)) = (r["checkpoint_s"].as_f64(), r["guest.runc_checkpoint_s"].as_f64()) {
                        result(&format!("shim_checkpoint_s{tag}"), shim, "s", "the shim's Checkpoint call (guest dump + copy to containerd's dir)");
                        result(&format!("criu_dump_in_guest_s{tag}"), guest, "s", "runc checkpoint (CRIU dump) inside the guest");
                        if let Some(w) = r["criu.dump.memwrite_time_us"].as_u64() {
                            result(&format!("criu_memwrite_s{tag}"), w as f64 / 1e6, "s", "CRIU's own stats-dump: writing pages to the shared dir");
                        }
                    }
                }
                let rid = format!("{id}-r");
                let t = Instant::now();
                let o = c.ctr(&["containers", "restore", "--live", "--rw", &rid, &image]);
                let restore_s = t.elapsed().as_secs_f64();
                if o.status.success() {
                    let vm = if name == "kata_rs" { "new VM boot + " } else { "" };
                    result(&format!("restore_s{tag}"), restore_s, "s", &format!("ctr containers restore --live --rw ({vm}CRIU restore)"));
                    if name == "kata_rs" {
                        if let Some(s) = report(c, &rid, "criu-restore.stats.json")["restore_s"].as_f64() {
                            result(&format!("shim_restore_s{tag}"), s, "s", "the restore inside Start (CRIU restore in the guest), no VM boot");
                        }
                    }
                } else {
                    println!("# restore_s{tag} not measured: {}", String::from_utf8_lossy(&o.stderr).trim());
                }
                let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &rid]);
                let _ = c.ctr(&["task", "rm", "-f", &rid]);
                let _ = c.ctr(&["container", "rm", &rid]);
                let _ = c.ctr(&["images", "rm", "--sync", &image]);
            }
            // (runc's task can be gone already after its checkpoint: a kill of a finished task fails.)
            if !c.ctr(&["task", "kill", "-s", "SIGKILL", &id]).status.success() {
                println!("# {tag}: the task had already ended when the bench went to kill it");
            }
            c.wait_status(&id, "STOPPED", Duration::from_secs(60));
            let _ = c.ctr(&["task", "rm", &id]);
            let _ = c.ctr(&["container", "rm", &id]);
        }
    }
}

/// Load figures (tests/src/load.rs): four containers created, checkpointed and restored at once; 20
/// checkpoints of one container and 10 checkpoint/restore cycles, with the shim's RSS and descriptors,
/// containerd's descriptors, host mounts and processes before and after.
fn load_figures() {
    use kata_rs_tests::{containerd::Containerd, load};
    let c = Containerd::start();
    let f = load::four_at_once(&c, "bq");
    result("four_at_once_create_s", f.create_s, "s", "4 x ctr run -d at once, until all 4 run (the slowest)");
    result("four_at_once_checkpoint_s", f.checkpoint_s, "s", "4 x ctr containers checkpoint --task --rw at once (the slowest)");
    result("four_at_once_restore_s", f.restore_s, "s", "4 x ctr containers restore --live --rw at once (the slowest)");
    c.run_detached("bl", &[], load::COUNTER);
    load::wait_count(&c, "bl", 1, Duration::from_secs(300));
    let print = |what: &str, when: &str, s: load::Snapshot| {
        result(&format!("{what}_shim_rss_kib[{when}]"), s.shim_rss_kib as f64, "KiB", "");
        result(&format!("{what}_shim_fds[{when}]"), s.shim_fds as f64, "fds", "");
        result(&format!("{what}_containerd_fds[{when}]"), s.containerd_fds as f64, "fds", "");
        result(&format!("{what}_host_mounts[{when}]"), s.mounts as f64, "mounts", "below this containerd's directory");
        result(&format!("{what}_processes[{when}]"), s.processes as f64, "processes", "shim, QEMU, virtiofsd, vhost-device-vsock");
    };
    let (before, after, times) = load::repeated_checkpoints(&c, "bl", 20);
    print("checkpoints20", "before", before);
    print("checkpoints20", "after", after);
    result("checkpoint_small_s", median(times), "s", "median of 20 checkpoints of one small container (shim Checkpoint to a directory)");
    let (first, last, times) = load::cycles(&c, "bl", 10);
    print("cycles10", "after_first", first);
    print("cycles10", "after_last", last);
    result("checkpoint_restore_cycle_s", median(times), "s", "median of 10: ctr containers checkpoint --task --rw, kill, rm, ctr containers restore --live --rw");
    c.kill_and_remove("bl");
}

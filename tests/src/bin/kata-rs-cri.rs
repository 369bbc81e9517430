//! `kata-rs-cri`: a small crictl-like client of containerd's CRI service (the tests' client,
//! `kata_rs_tests::cri`), to make the tests' CRI calls by hand.
//!
//! ```text
//! kata-rs-cri --address SOCK COMMAND
//!   version                                  runtime name and versions
//!   runp POD.json                            RunPodSandbox; prints the pod id
//!   pods-status POD-ID                       PodSandboxStatus: state, IP, runtime handler
//!   create POD-ID POD.json CONTAINER.json    CreateContainer; prints the container id
//!   restore POD-ID POD.json CONTAINER.json ARCHIVE
//!                                            CreateContainer from a checkpoint archive; prints the id
//!   start ID | stop ID [TIMEOUT_S] | rm ID   StartContainer, StopContainer (default 10 s), RemoveContainer
//!   exec ID [--timeout S] -- CMD...          ExecSync: prints stdout (stderr on stderr), exits with its code
//!   inspect ID                               ContainerStatus as JSON
//!   ps [POD-ID]                              ListContainers: id, name, state, pod
//!   stopp POD-ID | rmp POD-ID                StopPodSandbox, RemovePodSandbox
//!   checkpoint ID ARCHIVE.tar                CheckpointContainer into ARCHIVE.tar (a path of containerd's host)
//!   logs ID                                  prints the container's CRI log file
//! ```
//! POD.json is a `PodSpec`, CONTAINER.json a `ContainerSpec` (kata_rs_tests::cri), by field name:
//! `{"name": "web", "runtime_handler": "kata-rs", "log_directory": "/tmp/pod-logs",
//!   "annotations": {"io.kata-rs.x": "1"}}` and
//! `{"name": "app", "image": "docker.io/library/kata-busybox:latest", "args": ["sleep", "3600"],
//!   "env": {"A": "b"}, "log_path": "app.log"}`; further fields: namespace, uid, hostname,
//! cgroup_parent, share_process_namespace, memory_limit_bytes, labels (pod); command, working_dir, labels, annotations (container).
//! `create` takes the pod's file again because CRI wants the pod's config with each container.
use std::path::Path;

use anyhow::{bail, Context, Result};
use kata_rs_tests::cri::{ContainerSpec, Cri, PodSpec};
use serde::de::DeserializeOwned;

/// One of the JSON inputs.
fn read_json<T: DeserializeOwned>(path: &str) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {path}"))
}

/// The command's argument `i`, or a usage error naming `what`.
fn arg<'a>(args: &'a [String], i: usize, what: &str) -> Result<&'a str> {
    args.get(i).map(String::as_str).with_context(|| format!("missing {what} (see the doc comment of kata-rs-cri)"))
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (address, rest) = match argv.as_slice() {
        [flag, address, rest @ ..] if flag == "--address" => (address.clone(), rest.to_vec()),
        _ => bail!("usage: kata-rs-cri --address SOCK COMMAND ... (see the doc comment of kata-rs-cri)"),
    };
    let cri = Cri::connect(&address)?;
    let cmd = arg(&rest, 0, "command")?;
    let args = &rest[1..];
    match cmd {
        "version" => version(&cri),
        "runp" => runp(&cri, arg(args, 0, "POD.json")?),
        "pods-status" => pod_status(&cri, arg(args, 0, "POD-ID")?),
        "create" | "restore" => create(&cri, cmd, args),
        "start" => cri.start_container(arg(args, 0, "ID")?),
        "stop" => cri.stop_container(arg(args, 0, "ID")?, args.get(1).map(|t| t.parse()).transpose()?.unwrap_or(10)),
        "rm" => cri.remove_container(arg(args, 0, "ID")?),
        "exec" => exec(&cri, args),
        "inspect" => inspect(&cri, arg(args, 0, "ID")?),
        "ps" => ps(&cri, args.first().map(String::as_str)),
        "stopp" => cri.stop_pod_sandbox(arg(args, 0, "POD-ID")?),
        "rmp" => cri.remove_pod_sandbox(arg(args, 0, "POD-ID")?),
        "checkpoint" => cri.checkpoint_container(arg(args, 0, "ID")?, Path::new(arg(args, 1, "ARCHIVE.tar")?), 0),
        "logs" => logs(&cri, arg(args, 0, "ID")?),
        other => bail!("unknown command {other:?} (see the doc comment of kata-rs-cri)"),
    }
}

fn version(cri: &Cri) -> Result<()> {
    let v = cri.version()?;
    println!("{} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version);
    Ok(())
}

fn runp(cri: &Cri, pod_json: &str) -> Result<()> {
    println!("{}", cri.run_pod_sandbox(&read_json(pod_json)?)?);
    Ok(())
}

fn pod_status(cri: &Cri, id: &str) -> Result<()> {
    let p = cri.pod_status(id)?;
    println!("state {:?}\nip {}\nadditional_ips {:?}\nruntime_handler {}", p.state, p.ip, p.additional_ips, p.runtime_handler);
    Ok(())
}

/// `create POD-ID POD.json CONTAINER.json` and `restore … ARCHIVE`.
fn create(cri: &Cri, cmd: &str, args: &[String]) -> Result<()> {
    let pod_id = arg(args, 0, "POD-ID")?;
    let pod = read_json::<PodSpec>(arg(args, 1, "POD.json")?)?.to_config();
    let spec: ContainerSpec = read_json(arg(args, 2, "CONTAINER.json")?)?;
    let id = if cmd == "restore" {
        cri.restore_container_in(pod_id, &pod, Path::new(arg(args, 3, "ARCHIVE")?), &spec)?
    } else {
        cri.create_container_in(pod_id, &pod, &spec)?
    };
    println!("{id}");
    Ok(())
}

/// `exec ID [--timeout S] -- CMD...`: exits with the command's exit code.
fn exec(cri: &Cri, args: &[String]) -> Result<()> {
    let id = arg(args, 0, "ID")?;
    let dashes = args.iter().position(|a| a == "--").context("exec ID [--timeout S] -- CMD...")?;
    let timeout = match &args[1..dashes] {
        [] => 0,
        [flag, s] if flag == "--timeout" => s.parse()?,
        other => bail!("unexpected {other:?} before --"),
    };
    let cmd: Vec<&str> = args[dashes + 1..].iter().map(String::as_str).collect();
    let out = cri.exec_sync(id, &cmd, timeout)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    std::process::exit(out.exit_code);
}

fn inspect(cri: &Cri, id: &str) -> Result<()> {
    let s = cri.container_status(id)?;
    let v = serde_json::json!({
        "id": s.id, "name": s.name, "state": format!("{:?}", s.state), "exit_code": s.exit_code,
        "reason": s.reason, "message": s.message, "log_path": s.log_path, "image": s.image,
        "image_ref": s.image_ref, "started_at_ns": s.started_at_ns, "finished_at_ns": s.finished_at_ns,
        "annotations": s.annotations,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn ps(cri: &Cri, pod: Option<&str>) -> Result<()> {
    for c in cri.list_containers(pod)? {
        let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
        println!("{} {name} {:?} {}", c.id, c.state(), c.pod_sandbox_id);
    }
    Ok(())
}

fn logs(cri: &Cri, id: &str) -> Result<()> {
    let path = cri.container_status(id)?.log_path;
    anyhow::ensure!(!path.is_empty(), "container {id} has no log file (no log_path)");
    print!("{}", std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?);
    Ok(())
}

//! A private containerd (Debian's, own config, sockets and state under /run/kata-rs-e2e/) with the
//! kata-rs shim of this checkout on its PATH and a locally built busybox image imported.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const IMAGE: &str = "docker.io/library/kata-busybox:latest";
pub const RUNTIME: &str = "io.containerd.kata-rs.v2";

pub struct Containerd {
    pub dir: PathBuf,
    child: Child,
    pub address: String,
    /// kata-rs's runtime root for this containerd's sandboxes.
    pub runtime_root: PathBuf,
    bin_dir: PathBuf,
    /// PATH of containerd (the shim of this checkout first).
    path: String,
}

/// Starts containerd with this test's config; it stages checkpoint images in its XDG_RUNTIME_DIR, `<dir>/xdg`.
/// containerd with `dir/config.toml`; kata-rs's configuration is `dir/kata.toml` unless `installed`
/// (then the shim finds its own, as after `make install`).
fn spawn_containerd(dir: &Path, bin_dir: &Path, path: &str, installed: bool) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("containerd.log")).unwrap();
    let mut cmd = Command::new(if bin_dir.as_os_str().is_empty() { PathBuf::from("containerd") } else { bin_dir.join("containerd") });
    if installed {
        cmd.env_remove("KATA_RS_CONFIG");
    } else {
        cmd.env("KATA_RS_CONFIG", dir.join("kata.toml"));
    }
    cmd.arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting containerd (make setup installs it)")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The OCI image tar of the test image: the guest image's busybox plus /bin/memhog (tests/images/memhog.c,
/// built static here). Rebuilt when memhog.c or the busybox binary is newer than the tar.
pub fn busybox_image() -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = workspace().join("build/images");
    let out = dir.join("busybox-oci.tar");
    let src = workspace().join("tests/images/memhog.c");
    let bb = crate::guest_dir().join("test-rootfs/bin/busybox");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match mtime(&out) {
        None => true,
        Some(t) => [&src, &bb].iter().any(|p| mtime(p).is_some_and(|m| m > t)),
    };
    if stale {
        std::fs::create_dir_all(&dir).unwrap();
        let memhog = dir.join("memhog");
        let st = Command::new("gcc").args(["-O2", "-static", "-Wall", "-o"]).arg(&memhog).arg(&src).status().expect("running gcc");
        assert!(st.success(), "building memhog");
        let tmp = dir.join("busybox-oci.tar.tmp");
        let st = Command::new("python3")
            .arg(workspace().join("tests/images/mkimage.py"))
            .arg(&bb)
            .arg(&tmp)
            .arg(IMAGE)
            .arg(format!("{}:/bin/memhog", memhog.display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "building the busybox OCI image");
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

impl Containerd {
    /// Starts containerd (binary from `$KATA_RS_CONTAINERD_BIN_DIR`, else PATH) and imports the image.
    pub fn start() -> Containerd {
        Self::start_with("")
    }

    /// Like [`Containerd::start`], with `hypervisor_extra` (TOML lines) added to kata-rs's `[hypervisor]` table.
    /// A containerd directory with its config.toml; returns (dir, address).
    fn prepare_dir(extra_config: &str) -> (PathBuf, String) {
        let dir = PathBuf::from(format!("/run/kata-rs-e2e/{}", crate::unique_id("c")));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["root", "state", "xdg", "fifo"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let address = dir.join("c.sock").display().to_string();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n[debug]\n  level = \"debug\"\n{extra_config}",
                dir.display(),
                address
            ),
        )
        .unwrap();
        (dir, address)
    }

    /// containerd as it runs after `make install`: kata-rs's shim found on a standard PATH (not this
    /// checkout's target directory), no KATA_RS_CONFIG, so the shim reads /etc/kata-rs and uses the
    /// default runtime root. The caller installs first.
    pub fn start_installed() -> Containerd {
        let (dir, address) = Self::prepare_dir("");
        let bin_dir = std::env::var_os("KATA_RS_CONTAINERD_BIN_DIR").map(PathBuf::from).unwrap_or_default();
        let std_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        let path = if bin_dir.as_os_str().is_empty() { std_path.to_string() } else { format!("{}:{std_path}", bin_dir.display()) };
        let child = spawn_containerd(&dir, &bin_dir, &path, true);
        let c = Containerd { dir, child, address, runtime_root: PathBuf::from("/run/kata-rs"), bin_dir, path };
        c.wait_up();
        c.ctr_ok(&["images", "import", busybox_image().to_str().unwrap()]);
        c
    }

    pub fn start_with(hypervisor_extra: &str) -> Containerd {
        let shim = workspace().join("target/release/containerd-shim-kata-rs-v2");
        assert!(shim.exists(), "{} missing: run 'make build'", shim.display());
        let (dir, address) = Self::prepare_dir("");
        let mut kata = crate::test_config();
        kata.runtime.root = dir.join("kr");
        let g = crate::guest_dir();
        std::fs::write(
            dir.join("kata.toml"),
            format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = {}\nvcpus = {}\ntcg_thread = \"{}\"\n{}{hypervisor_extra}\n[runtime]\nroot = \"{}\"\nlog_level = \"debug\"\n",
                g.join("vmlinux").display(),
                g.join("initramfs.cpio").display(),
                kata.hypervisor.memory_mib,
                kata.hypervisor.vcpus,
                kata.hypervisor.tcg_thread,
                if kata.hypervisor.kernel_params.is_empty() || hypervisor_extra.contains("kernel_params") {
                    String::new()
                } else {
                    format!("kernel_params = {:?}\n", kata.hypervisor.kernel_params)
                },
                kata.runtime.root.display()
            ),
        )
        .unwrap();
        let bin_dir = std::env::var_os("KATA_RS_CONTAINERD_BIN_DIR").map(PathBuf::from).unwrap_or_default();
        let path = format!(
            "{}:{}{}",
            shim.parent().unwrap().display(),
            if bin_dir.as_os_str().is_empty() { String::new() } else { format!("{}:", bin_dir.display()) },
            std::env::var("PATH").unwrap_or_default()
        );
        let child = spawn_containerd(&dir, &bin_dir, &path, false);
        let runtime_root = kata.runtime.root.clone();
        let c = Containerd { dir, child, address, runtime_root, bin_dir, path };
        c.wait_up();
        let version = c.ctr_ok(&["version"]);
        eprintln!("containerd under test: {}", version.lines().filter(|l| l.contains("Version")).collect::<Vec<_>>().join(" | "));
        let img = busybox_image();
        c.ctr_ok(&["images", "import", img.to_str().unwrap()]);
        c
    }

    fn wait_up(&self) {
        let start = Instant::now();
        while !self.ctr(&["version"]).status.success() {
            assert!(start.elapsed() < Duration::from_secs(30), "containerd did not come up; see {}", self.dir.join("containerd.log").display());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The major version of ctr (the client: ctr 2.x sends runc's checkpoint options to every runtime).
    pub fn ctr_major(&self) -> u32 {
        let v = self.ctr_ok(&["version"]);
        let client = v.lines().skip_while(|l| !l.starts_with("Client")).find(|l| l.trim_start().starts_with("Version:")).unwrap_or_default();
        let num = client.split(':').nth(1).unwrap_or_default().trim().trim_start_matches('v');
        num.split('.').next().and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("ctr version: {v}"))
    }

    /// Stops containerd (SIGTERM; its shims go on running) and starts it again on the same state.
    pub fn restart(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let installed = !self.dir.join("kata.toml").exists();
        self.child = spawn_containerd(&self.dir, &self.bin_dir, &self.path, installed);
        self.wait_up();
    }

    /// Starts `ctr events`, writing what containerd publishes to `<dir>/<name>.events`; killed on drop.
    pub fn events(&self, name: &str) -> Events {
        let path = self.dir.join(format!("{name}.events"));
        let out = std::fs::File::create(&path).unwrap();
        let child = Command::new(self.ctr_path()).arg("--address").arg(&self.address).arg("events").stdout(out).stderr(Stdio::null()).spawn().expect("ctr events");
        // Subscribed once ctr is connected: give it a moment, then check it still runs.
        std::thread::sleep(Duration::from_millis(300));
        Events { child, path }
    }

    /// Checkpoint images containerd is staging (or left) in its XDG_RUNTIME_DIR (`ctd-checkpoint*`).
    pub fn staged_checkpoints(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("xdg"))
            .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("ctd-checkpoint")).collect())
            .unwrap_or_default()
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `ctr` matching this containerd.
    pub fn ctr_path(&self) -> PathBuf {
        if self.bin_dir.as_os_str().is_empty() {
            PathBuf::from("ctr")
        } else {
            self.bin_dir.join("ctr")
        }
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.ctr_path()).arg("--address").arg(&self.address).args(args).stdin(Stdio::null()).output().expect("running ctr")
    }

    /// Runs ctr, panics with its output on failure, returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(o.status.success(), "ctr {args:?} failed ({}): {}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ctr run -d` of the busybox image under kata-rs.
    pub fn run_detached(&self, id: &str, extra: &[&str], cmd: &[&str]) {
        self.run_detached_with(RUNTIME, id, extra, cmd)
    }

    /// `ctr run -d` of the busybox image under the given runtime.
    pub fn run_detached_with(&self, runtime: &str, id: &str, extra: &[&str], cmd: &[&str]) {
        let fifo = self.dir.join("fifo").display().to_string();
        let mut a = vec!["run", "-d", "--runtime", runtime, "--fifo-dir", &fifo];
        a.extend_from_slice(extra);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(cmd);
        self.ctr_ok(&a);
    }

    /// The host path of a container's rootfs (containerd's mount in the bundle).
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.bundle(id).join("rootfs")
    }

    /// SIGKILLs the task, waits until it is stopped, then removes task and container.
    pub fn kill_and_remove(&self, id: &str) {
        self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        self.wait_status(id, "STOPPED", Duration::from_secs(120));
        self.ctr_ok(&["task", "rm", id]);
        self.ctr_ok(&["container", "rm", id]);
    }

    /// The bundle directory containerd made for `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join("state/io.containerd.runtime.v2.task/default").join(id)
    }

    /// A ttrpc client of the shim containerd started for `id` (its address file in the bundle): for
    /// requests `ctr` cannot make, such as checkpoint options, which ctr sends to runc runtimes only.
    pub fn shim_client(&self, id: &str) -> containerd_shim::protos::shim_sync::TaskClient {
        let address = std::fs::read_to_string(self.bundle(id).join("address")).expect("the shim's address file");
        let client = containerd_shim::protos::shim_sync::Client::connect(address.trim()).expect("connecting to the shim");
        containerd_shim::protos::shim_sync::TaskClient::new(client)
    }

    /// The shim binary with the flags and environment containerd gives it for task `id` in `bundle`;
    /// the caller adds the action (`start`, `-bundle … delete`).
    fn shim_command(&self, id: &str, bundle: &Path) -> Command {
        let containerd = if self.bin_dir.as_os_str().is_empty() { PathBuf::from("/usr/bin/containerd") } else { self.bin_dir.join("containerd") };
        let mut cmd = Command::new(workspace().join("target/release/containerd-shim-kata-rs-v2"));
        cmd.args(["-namespace", "default", "-address", &self.address, "-publish-binary"])
            .arg(&containerd)
            .args(["-id", id])
            .current_dir(bundle)
            .env("KATA_RS_CONFIG", self.dir.join("kata.toml"))
            .env("TTRPC_ADDRESS", format!("{}.ttrpc", self.address))
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a kata-rs shim for task `id` on `bundle` as containerd would (`start` in the bundle), for
    /// requests containerd never sends (a bundle without config.json, a restore from a hand-made
    /// directory). Returns its client; [`Containerd::remove_direct_shim`] undoes it.
    pub fn direct_shim(&self, id: &str, bundle: &Path) -> containerd_shim::protos::shim_sync::TaskClient {
        let o = self.shim_command(id, bundle).arg("start").output().expect("running the shim's start");
        assert!(o.status.success(), "shim start: {}", String::from_utf8_lossy(&o.stderr));
        let address = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let client = containerd_shim::protos::shim_sync::Client::connect(&address).expect("connecting to the shim");
        containerd_shim::protos::shim_sync::TaskClient::new(client)
    }

    /// Shuts a [`Containerd::direct_shim`] down and runs its `delete`, as containerd does.
    pub fn remove_direct_shim(&self, client: &containerd_shim::protos::shim_sync::TaskClient, id: &str, bundle: &Path) {
        use containerd_shim::protos::{api::ShutdownRequest, ttrpc::context};
        let _ = client.shutdown(context::with_timeout(10_000_000_000), &ShutdownRequest { id: id.into(), now: true, ..Default::default() });
        let o = self.shim_command(id, bundle).arg("-bundle").arg(bundle).arg("delete").output().expect("running the shim's delete");
        assert!(o.status.success(), "shim delete: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// A bundle for a direct shim: the busybox test rootfs and a spec running `args`, with `hooks`
    /// (and the annotation io.kata-rs.test=hooks).
    pub fn hooked_bundle(&self, id: &str, args: &[&str], hooks: serde_json::Value) -> PathBuf {
        let bundle = self.dir.join("bundles").join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        let st = Command::new("cp").arg("-a").arg(crate::guest_dir().join("test-rootfs")).arg(bundle.join("rootfs")).status().unwrap();
        assert!(st.success());
        let mut spec: serde_json::Value = serde_json::from_slice(&crate::oci_spec(args)).unwrap();
        spec["hooks"] = hooks;
        spec["annotations"] = serde_json::json!({"io.kata-rs.test": "hooks"});
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        bundle
    }

    /// Blobs of containerd's content store.
    pub fn content_blobs(&self) -> Vec<PathBuf> {
        let d = self.dir.join("root/io.containerd.content.v1.content/blobs/sha256");
        std::fs::read_dir(d).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    /// The status column of `ctr task ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find(|l| l.split_whitespace().next() == Some(id)).and_then(|l| l.split_whitespace().nth(2)).map(str::to_string)
    }

    pub fn wait_status(&self, id: &str, want: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let s = self.task_status(id);
            if s.as_deref() == Some(want) {
                return;
            }
            assert!(start.elapsed() < limit, "task {id} is {s:?}, not {want}, after {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Processes of this containerd's kata-rs sandboxes, shims and mounts still present.
    pub fn leftovers(&self) -> Vec<String> {
        let kr = format!("{}/", self.runtime_root.display());
        let mut v: Vec<String> = crate::processes_mentioning(&kr).into_iter().map(|(p, c)| format!("process {p}: {c}")).collect();
        let me = self.address.clone();
        v.extend(
            crate::processes_mentioning(&format!("-address {me}"))
                .into_iter()
                .filter(|(_, c)| c.contains("containerd-shim-kata-rs-v2"))
                .map(|(p, c)| format!("shim {p}: {c}")),
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let d = self.dir.display().to_string();
        v.extend(mounts.lines().filter(|l| l.contains(&d) && !l.contains("/root/io.containerd")).map(|l| format!("mount: {l}")));
        if let Ok(entries) = std::fs::read_dir(&self.runtime_root) {
            v.extend(entries.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| format!("dir: {}", e.path().display())));
        }
        v
    }

    pub fn assert_clean(&self) {
        let start = Instant::now();
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "left behind:\n{}", left.join("\n"));
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A running `ctr events`.
pub struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    /// Waits until an event line with `topic` mentioning `id` was published.
    pub fn wait_for(&self, topic: &str, id: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(topic) && l.contains(&format!("\"{id}\""))) {
                return l.to_string();
            }
            assert!(start.elapsed() < limit, "no {topic} event of {id} within {limit:?}; events:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Containerd {
    /// Also after a failed test: stop containerd, kill its kata-rs shims (their VMs die with them,
    /// PR_SET_PDEATHSIG) and lazily unmount what they left, so no test leaves VMs running.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        for (pid, _) in crate::processes_mentioning(&format!("-address {}", self.address)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let d = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<&str> = mounts.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| m.starts_with(&d)).collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

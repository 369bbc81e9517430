//! A private containerd (Debian's, own config, sockets and state under /run/kata-rs-e2e/) with the
//! kata-rs shim of this checkout on its PATH and a locally built busybox image imported; with
//! [`Containerd::start_cri`], containerd 2.x's CRI plugin serving pods under kata-rs or runc.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const IMAGE: &str = "docker.io/library/kata-busybox:latest";
pub const RUNTIME: &str = "io.containerd.kata-rs.v2";
/// The sandbox (pause) image of [`Containerd::start_cri`]: busybox sleeping, built here ([`pause_image`]).
pub const PAUSE_IMAGE: &str = "docker.io/library/local-pause:latest";
/// The CRI runtime handlers of [`Containerd::start_cri`] (a pod's `runtime_handler`).
pub const KATA_HANDLER: &str = "kata-rs";
pub const RUNC_HANDLER: &str = "runc";
/// containerd's namespace of CRI's pods, containers and images.
pub const CRI_NAMESPACE: &str = "k8s.io";

pub struct Containerd {
    pub dir: PathBuf,
    child: Child,
    pub address: String,
    /// kata-rs's runtime root for this containerd's sandboxes.
    pub runtime_root: PathBuf,
    bin_dir: PathBuf,
    /// PATH of containerd (the shim of this checkout first).
    path: String,
    /// The containerd namespace of ctr's commands and of bundles: `default`, or [`CRI_NAMESPACE`] under CRI.
    pub namespace: &'static str,
}

/// Starts containerd with this test's config; it stages checkpoint images in its XDG_RUNTIME_DIR, `<dir>/xdg`.
/// containerd with `dir/config.toml`; kata-rs's configuration is `dir/kata.toml` unless `installed`
/// (then the shim finds its own, as after `make install`).
fn spawn_containerd(dir: &Path, bin_dir: &Path, path: &str, installed: bool) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("containerd.log")).unwrap();
    let mut cmd = Command::new(containerd_binary(bin_dir));
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

/// The shim of this checkout (`make build`).
fn dev_shim() -> PathBuf {
    let shim = workspace().join("target/release/containerd-shim-kata-rs-v2");
    assert!(shim.exists(), "{} missing: run 'make build'", shim.display());
    shim
}

/// Serializes the building of images (tests of one binary may run in parallel).
static IMAGE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where built images are cached.
fn images_dir() -> PathBuf {
    workspace().join("build/images")
}

/// The guest image's busybox binary, which the test images are made of.
fn guest_busybox() -> PathBuf {
    crate::guest_dir().join("test-rootfs/bin/busybox")
}

/// Is `out` missing, or older than one of `inputs`?
fn stale(out: &Path, inputs: &[&Path]) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match mtime(out) {
        None => true,
        Some(t) => inputs.iter().any(|p| mtime(p).is_some_and(|m| m > t)),
    }
}

/// Builds `out` (through a temporary file) with tests/images/mkimage.py: image `name` of the guest's
/// busybox plus `extras` (`src:dest`), with `cmd` (a JSON array) as its Cmd when given.
fn mkimage(out: &Path, name: &str, extras: &[String], cmd: Option<&str>) {
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let tmp = out.with_extension("tar.tmp");
    let mut c = Command::new("python3");
    c.arg(workspace().join("tests/images/mkimage.py")).arg(guest_busybox()).arg(&tmp).arg(name).args(extras).stdout(Stdio::null());
    if let Some(cmd) = cmd {
        c.env("MKIMAGE_CMD", cmd);
    }
    let st = c.status().expect("running mkimage.py");
    assert!(st.success(), "building the OCI image {name}");
    std::fs::rename(&tmp, out).unwrap();
}

/// The OCI image tar of the test image: the guest image's busybox plus /bin/memhog (tests/images/memhog.c,
/// built static here) and the blank /count it writes. Rebuilt when memhog.c or the busybox binary is newer than the tar.
/// The status code of a failed shim call (None when it failed without a status: a transport error).
pub fn rpc_code(e: &containerd_shim::protos::ttrpc::Error) -> Option<containerd_shim::protos::ttrpc::Code> {
    match e {
        containerd_shim::protos::ttrpc::Error::RpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

pub fn busybox_image() -> PathBuf {
    let _g = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = images_dir();
    let out = dir.join("busybox-oci.tar");
    let src = workspace().join("tests/images/memhog.c");
    if stale(&out, &[&src, &guest_busybox()]) {
        std::fs::create_dir_all(&dir).unwrap();
        let memhog = dir.join("memhog");
        let st = Command::new("gcc").args(["-O2", "-static", "-Wall", "-o"]).arg(&memhog).arg(&src).status().expect("running gcc");
        assert!(st.success(), "building memhog");
        // memhog keeps /count open: the image has it (blank, the width memhog writes), so a checkpoint
        // without the rootfs diff restores too.
        let count = dir.join("count-blank");
        std::fs::write(&count, format!("{:20}\n", "")).unwrap();
        mkimage(&out, IMAGE, &[format!("{}:/bin/memhog", memhog.display()), format!("{}:/count", count.display())], None);
    }
    out
}

/// The OCI image tar of [`PAUSE_IMAGE`], CRI's sandbox image: the guest image's busybox whose Cmd
/// sleeps forever. Rebuilt when the busybox binary is newer than the tar.
pub fn pause_image() -> PathBuf {
    let _g = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = images_dir().join("pause-oci.tar");
    if stale(&out, &[&guest_busybox()]) {
        mkimage(&out, PAUSE_IMAGE, &[], Some(r#"["/bin/sleep","2147483647"]"#));
    }
    out
}

/// `$KATA_RS_CONTAINERD_BIN_DIR` (containerd, ctr and runc's shim of another version), else empty: PATH's.
fn containerd_bin_dir() -> PathBuf {
    std::env::var_os("KATA_RS_CONTAINERD_BIN_DIR").map(PathBuf::from).unwrap_or_default()
}

/// The containerd binary of `bin_dir` (empty: PATH's).
fn containerd_binary(bin_dir: &Path) -> PathBuf {
    if bin_dir.as_os_str().is_empty() {
        PathBuf::from("containerd")
    } else {
        bin_dir.join("containerd")
    }
}

/// Copies the test network's conflist ([`crate::netns::conflist_path`], written in an isolated run)
/// into CNI configuration directory `conf_dir`.
fn copy_test_network(conf_dir: &Path) {
    std::fs::create_dir_all(conf_dir).unwrap();
    let conflist = crate::netns::conflist_path();
    std::fs::copy(&conflist, conf_dir.join(conflist.file_name().unwrap()))
        .unwrap_or_else(|e| panic!("{}: {e} (CRI's pods need the test network: start_cri belongs in a netns::isolated run)", conflist.display()));
}

/// The major version in `containerd --version`'s output ("containerd <module> 2.1.9+unknown", or "v2.1.9").
fn containerd_major(version: &str) -> Option<u32> {
    let v = version.split_whitespace().skip(1).map(|w| w.trim_start_matches('v')).find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    v.split('.').next()?.parse().ok()
}

/// containerd's config (version 3, containerd 2.x) for [`Containerd::start_cri`]: sockets and state in
/// `dir` (the CRI plugin's own root and state are `io.containerd.grpc.v1.cri` in them), the pinned
/// pause image, the runtime handlers `kata-rs` (pod and container annotations `io.kata-rs.*` reach its
/// OCI specs) and `runc`, Debian's CNI plugins and the test network's conflist in `dir/cni/net.d`.
/// restrict_oom_score_adj: this host refuses the pause container's oom_score_adj of -998 otherwise.
fn cri_config(dir: &Path, address: &str) -> String {
    // TOML ignores the indentation.
    format!(
        r#"
        version = 3
        root = "{d}/root"
        state = "{d}/state"
        [grpc]
          address = "{address}"
        [ttrpc]
          address = "{address}.ttrpc"
        [debug]
          level = "debug"
        [plugins.'io.containerd.cri.v1.images'.pinned_images]
          sandbox = '{PAUSE_IMAGE}'
        [plugins.'io.containerd.cri.v1.runtime']
          restrict_oom_score_adj = true
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{KATA_HANDLER}]
          runtime_type = '{RUNTIME}'
          pod_annotations = ['io.kata-rs.*']
          container_annotations = ['io.kata-rs.*']
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{RUNC_HANDLER}]
          runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.cni]
          bin_dirs = ['{bin}']
          conf_dir = '{d}/cni/net.d'
        "#,
        d = dir.display(),
        bin = crate::netns::CNI_BIN,
    )
}

impl Containerd {
    /// Starts containerd (binary from `$KATA_RS_CONTAINERD_BIN_DIR`, else PATH) and imports the image.
    pub fn start() -> Containerd {
        Self::start_with("")
    }

    /// A new containerd directory (without config.toml); returns (dir, address).
    fn new_dir() -> (PathBuf, String) {
        let dir = PathBuf::from(format!("/run/kata-rs-e2e/{}", crate::unique_id("c")));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["root", "state", "xdg", "fifo"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let address = dir.join("c.sock").display().to_string();
        (dir, address)
    }

    /// A containerd directory with its config.toml (version 2, CRI disabled); returns (dir, address).
    fn prepare_dir(extra_config: &str) -> (PathBuf, String) {
        let (dir, address) = Self::new_dir();
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
        let bin_dir = containerd_bin_dir();
        let std_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        let path = if bin_dir.as_os_str().is_empty() { std_path.to_string() } else { format!("{}:{std_path}", bin_dir.display()) };
        let child = spawn_containerd(&dir, &bin_dir, &path, true);
        let c = Containerd { dir, child, address, runtime_root: PathBuf::from("/run/kata-rs"), bin_dir, path, namespace: "default" };
        c.wait_up();
        c.ctr_ok(&["images", "import", busybox_image().to_str().unwrap()]);
        c
    }

    /// Like [`Containerd::start`], with `hypervisor_extra` (TOML lines) added to kata-rs's `[hypervisor]` table.
    pub fn start_with(hypervisor_extra: &str) -> Containerd {
        let shim = dev_shim();
        let (dir, address) = Self::prepare_dir("");
        let c = Self::spawn_dev(&shim, dir, address, hypervisor_extra, "default");
        let img = busybox_image();
        c.ctr_ok(&["images", "import", img.to_str().unwrap()]);
        c
    }

    /// containerd 2.x (binary from `$KATA_RS_CONTAINERD_BIN_DIR`, else PATH) with its CRI plugin (config:
    /// `cri_config`), kata-rs as in [`Containerd::start`], the pause and busybox images imported into the
    /// k8s.io namespace (ctr's commands of this containerd use that namespace); returns once CRI reports
    /// its runtime and network ready (see [`Containerd::cri`]). Pods get addresses on the test network
    /// (CNI): call it inside a [`crate::netns::isolated`] run, whose conflist it uses.
    pub fn start_cri() -> Containerd {
        Self::start_cri_with("")
    }

    /// Like [`Containerd::start_cri`], with `hypervisor_extra` (TOML lines) in kata-rs's `[hypervisor]` table.
    pub fn start_cri_with(hypervisor_extra: &str) -> Containerd {
        let shim = dev_shim();
        let o = Command::new(containerd_binary(&containerd_bin_dir())).arg("--version").output().expect("containerd --version");
        let version = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(containerd_major(&version).is_some_and(|m| m >= 2), "start_cri needs containerd 2.x (KATA_RS_CONTAINERD_BIN_DIR), not {version}");
        let (dir, address) = Self::new_dir();
        copy_test_network(&dir.join("cni/net.d"));
        std::fs::write(dir.join("config.toml"), cri_config(&dir, &address)).unwrap();
        let c = Self::spawn_dev(&shim, dir, address, hypervisor_extra, CRI_NAMESPACE);
        for img in [pause_image(), busybox_image()] {
            c.ctr_ok(&["images", "import", img.to_str().unwrap()]);
        }
        c.cri().wait_ready(Duration::from_secs(30)).expect("containerd's CRI service");
        c
    }

    /// A CRI client of this containerd ([`Containerd::start_cri`]).
    pub fn cri(&self) -> crate::cri::Cri {
        crate::cri::Cri::connect(&self.address).expect("connecting to containerd's CRI service")
    }

    /// Starts containerd on `dir` (its config.toml written) with `shim` of this checkout on its PATH and
    /// kata-rs's configuration `dir/kata.toml` (`hypervisor_extra` in `[hypervisor]`); waits until it is up.
    fn spawn_dev(shim: &Path, dir: PathBuf, address: String, hypervisor_extra: &str, namespace: &'static str) -> Containerd {
        let mut kata = crate::test_config();
        // CRI's ids are 64 characters: a short root keeps `<root>/<id>/<socket>` within a socket path's
        // 107 bytes (as /run/kata-rs does after make install).
        kata.runtime.root = if namespace == CRI_NAMESPACE { Path::new("/run/kr").join(dir.file_name().unwrap()) } else { dir.join("kr") };
        seed_accel_cache(&kata.runtime.root);
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
        let bin_dir = containerd_bin_dir();
        let path = format!(
            "{}:{}{}",
            shim.parent().unwrap().display(),
            if bin_dir.as_os_str().is_empty() { String::new() } else { format!("{}:", bin_dir.display()) },
            std::env::var("PATH").unwrap_or_default()
        );
        let child = spawn_containerd(&dir, &bin_dir, &path, false);
        let runtime_root = kata.runtime.root.clone();
        let c = Containerd { dir, child, address, runtime_root, bin_dir, path, namespace };
        c.wait_up();
        let version = c.ctr_ok(&["version"]);
        eprintln!("containerd under test: {}", version.lines().filter(|l| l.contains("Version")).collect::<Vec<_>>().join(" | "));
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
        let child =
            Command::new(self.ctr_path()).arg("--address").arg(&self.address).arg("events").stdout(out).stderr(Stdio::null()).spawn().expect("ctr events");
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

    /// Runs ctr on this containerd (in namespace k8s.io under CRI).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.ctr_path());
        cmd.arg("--address").arg(&self.address);
        if self.namespace != "default" {
            cmd.args(["--namespace", self.namespace]);
        }
        cmd.args(args).stdin(Stdio::null()).output().expect("running ctr")
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
        self.dir.join("state/io.containerd.runtime.v2.task").join(self.namespace).join(id)
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
        cmd.args(["-namespace", self.namespace, "-address", &self.address, "-publish-binary"])
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
        // By mount point, a whole path component at a time: /run/kata-rs is not /run/kata-rs-test.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        v.extend(
            mounts
                .lines()
                .filter(|l| {
                    let Some(m) = l.split_whitespace().nth(4) else { return false };
                    let m = Path::new(m);
                    (m.starts_with(&self.dir) && !l.contains("/root/io.containerd")) || m.starts_with(&self.runtime_root)
                })
                .map(|l| format!("mount: {l}")),
        );
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
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<&str> =
            mounts.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| Path::new(m).starts_with(&self.dir) || Path::new(m).starts_with(&self.runtime_root)).collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
        // A CRI containerd's runtime root is outside its directory (a short path): removed with it.
        if self.runtime_root.starts_with("/run/kr") {
            let _ = std::fs::remove_dir_all(&self.runtime_root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_versions_are_read_from_version_output() {
        assert_eq!(containerd_major("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n"), Some(2));
        assert_eq!(containerd_major("containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1"), Some(1));
        assert_eq!(containerd_major("containerd containerd.io v2.0.0 abc"), Some(2));
        assert_eq!(containerd_major(""), None);
    }

    #[test]
    fn the_cri_config_is_toml_with_the_handlers_and_the_test_network() {
        let c: toml::Value = toml::from_str(&cri_config(Path::new("/w"), "/w/c.sock")).unwrap();
        assert_eq!(c["version"].as_integer(), Some(3));
        let runtime = &c["plugins"]["io.containerd.cri.v1.runtime"];
        assert_eq!(runtime["containerd"]["runtimes"][KATA_HANDLER]["runtime_type"].as_str(), Some(RUNTIME));
        assert_eq!(runtime["containerd"]["runtimes"][RUNC_HANDLER]["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(runtime["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(runtime["cni"]["conf_dir"].as_str(), Some("/w/cni/net.d"));
        assert_eq!(c["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(), Some(PAUSE_IMAGE));
        assert_eq!(c["grpc"]["address"].as_str(), Some("/w/c.sock"));
    }
}

/// Puts the KVM probe's verdict (`vmm::accel`) into a new runtime root, so that each test's containerd
/// does not boot the probe guest again (8 s where KVM cannot run the guest): the verdict is made once
/// per test binary, by the shim's own code, into `/run/kata-rs-test`'s cache (shared with the tests that
/// boot VMs directly), and it is keyed by QEMU, kernel, initrd (with their mtimes) and CPU model, so a
/// changed guest probes again. The probe itself stays covered by the first VM of every run.
fn seed_accel_cache(root: &Path) {
    static SHARED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let cfg = crate::test_config();
        let cache = vmm::accel::default_cache_dir(&cfg.runtime.root);
        let qemu = vmm::config::resolve_program(&cfg.hypervisor.qemu_path).unwrap_or_else(|| cfg.hypervisor.qemu_path.clone());
        // On a thread of its own: a caller may be inside a runtime already.
        let c = cache.clone();
        let choice = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(vmm::accel::choose(&cfg.hypervisor, &qemu, &c))
        })
        .join()
        .unwrap();
        eprintln!("accelerator for this run: {} ({})", choice.accel, choice.reason);
        cache
    });
    let dst = vmm::accel::default_cache_dir(root);
    std::fs::create_dir_all(&dst).unwrap();
    let _ = std::fs::copy(shared.join("kvm-probe.json"), dst.join("kvm-probe.json"));
}

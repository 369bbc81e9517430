//! `configuration.toml`: where it is found, what it holds, and how it is checked.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::VmConfig;

/// Environment variable naming the configuration file (overrides the default search).
pub const CONFIG_ENV: &str = "KATA_RS_CONFIG";
/// Searched in order when neither the env var nor a runtime option names a file.
pub const DEFAULT_PATHS: &[&str] = &["/etc/kata-rs/configuration.toml", "/usr/share/kata-rs/configuration.toml"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How long to wait for the guest agent after QEMU starts, in seconds.
    pub connect_timeout_s: u64,
    /// Default deadline of one agent call, in seconds.
    pub rpc_timeout_s: u64,
    /// Guest agent log level (tracing filter), e.g. "info" or "debug".
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { connect_timeout_s: 90, rpc_timeout_s: 60, log_level: "info".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Per-sandbox runtime directories (sockets, logs, shared dir) live below this.
    pub root: PathBuf,
    /// Shim log level (tracing filter).
    pub log_level: String,
    /// Deadline of one checkpoint or restore, in seconds.
    pub checkpoint_deadline_s: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { root: "/run/kata-rs".into(), log_level: "info".into(), checkpoint_deadline_s: 600 }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: VmConfig,
    pub agent: AgentConfig,
    pub runtime: RuntimeConfig,
    /// The file this was read from (not a setting).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("configuration file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let path = origin.display().to_string();
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        c.source = Some(origin.to_path_buf());
        // Relative image paths are relative to the file's directory.
        if let Some(dir) = origin.parent() {
            for p in [&mut c.hypervisor.kernel, &mut c.hypervisor.initrd] {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        c.validate().map_err(|message| ConfigError::Invalid { path, message })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.hypervisor.validate().map_err(|e| e.to_string())?;
        if self.agent.connect_timeout_s == 0 {
            return Err("agent.connect_timeout_s must be above 0".into());
        }
        let min = agent_client::MIN_RPC_TIMEOUT.as_secs();
        if self.agent.rpc_timeout_s < min {
            return Err(format!(
                "agent.rpc_timeout_s = {} is below {min}: the guest gives runc create/exec {} s before it answers",
                self.agent.rpc_timeout_s,
                agent_client::RUNC_SPAWN_DEADLINE.as_secs()
            ));
        }
        if self.runtime.checkpoint_deadline_s == 0 {
            return Err("runtime.checkpoint_deadline_s must be above 0".into());
        }
        if !self.runtime.root.is_absolute() {
            return Err(format!("runtime.root {} must be an absolute path", self.runtime.root.display()));
        }
        Ok(())
    }

    /// Reads one file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text, path)
    }

    /// Finds the configuration: `explicit` (a runtime option), then `$KATA_RS_CONFIG`, then the default
    /// paths; built-in defaults when none exists.
    pub fn discover(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(p) = explicit {
            return Config::load(p);
        }
        if let Some(p) = std::env::var_os(CONFIG_ENV) {
            return Config::load(Path::new(&p));
        }
        for p in DEFAULT_PATHS {
            let p = Path::new(p);
            if p.exists() {
                return Config::load(p);
            }
        }
        Ok(Config::default())
    }
}

/// containerd's generic runtime options (`runtimeoptions.v1.Options`, what `ctr run
/// --runtime-config-path` and CRI's `ConfigPath` send to non-runc runtimes): field 2 is `config_path`.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// The configuration file named by a Create request's runtime options, if any.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, String> {
    if type_url.is_empty() && value.is_empty() {
        return Ok(None);
    }
    if type_url.rsplit('/').next() != Some(RUNTIME_OPTIONS_TYPE) {
        return Err(format!("runtime options of type {type_url:?} are not understood by kata-rs (it takes {RUNTIME_OPTIONS_TYPE})"));
    }
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(value);
    let mut path = None;
    while !input.eof().map_err(|e| format!("runtime options: {e}"))? {
        let tag = input.read_raw_varint32().map_err(|e| format!("runtime options: {e}"))?;
        match (tag >> 3, tag & 7) {
            (2, 2) => path = Some(input.read_string().map_err(|e| format!("runtime options: {e}"))?),
            (_, wire) => {
                let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire).ok_or_else(|| format!("runtime options: bad wire type {wire}"))?;
                input.skip_field(wt).map_err(|e| format!("runtime options: {e}"))?;
            }
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    #[test]
    fn runtime_options_name_the_config_file() {
        // type_url = "x" (field 1), config_path = "/etc/kata-rs/other.toml" (field 2)
        let mut v = vec![0x0a, 1, b'x', 0x12, 23];
        v.extend_from_slice(b"/etc/kata-rs/other.toml");
        assert_eq!(config_path_from_options(RUNTIME_OPTIONS_TYPE, &v).unwrap(), Some(PathBuf::from("/etc/kata-rs/other.toml")));
        assert_eq!(config_path_from_options("", &[]).unwrap(), None);
        assert!(config_path_from_options("containerd.runc.v1.Options", &v).unwrap_err().contains("not understood"));
    }

    use super::*;

    #[test]
    fn shipped_configuration_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/configuration.toml");
        let c = Config::load(&path).unwrap();
        let d = Config::default();
        assert_eq!(c.hypervisor, VmConfig { kernel: c.hypervisor.kernel.clone(), initrd: c.hypervisor.initrd.clone(), ..d.hypervisor });
        assert_eq!(c.agent, d.agent);
        assert_eq!(c.runtime, d.runtime);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[hypervisor]\nmemory_mb = 512\n", Path::new("/x/c.toml")).unwrap_err().to_string();
        assert!(e.contains("/x/c.toml") && e.contains("memory_mb"), "{e}");
    }

    #[test]
    fn invalid_value_is_named() {
        let e = Config::parse("[hypervisor]\nshared_fs = \"nfs\"\n", Path::new("/x/c.toml")).unwrap_err().to_string();
        assert!(e.contains("shared_fs") || e.contains("nfs"), "{e}");
        let e = Config::parse("[hypervisor]\nvcpus = 0\n", Path::new("/x/c.toml")).unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        // An RPC timeout the guest's own deadlines do not fit in.
        let e = Config::parse("[agent]\nrpc_timeout_s = 30\n", Path::new("/x/c.toml")).unwrap_err().to_string();
        assert!(e.contains("agent.rpc_timeout_s = 30") && e.contains("45 s"), "{e}");
        assert!(Config::parse("[agent]\nrpc_timeout_s = 55\n", Path::new("/x/c.toml")).is_ok());
        let e = Config::parse("[runtime]\nroot = \"rel\"\n", Path::new("/x/c.toml")).unwrap_err().to_string();
        assert!(e.contains("runtime.root"), "{e}");
    }

    #[test]
    fn relative_image_paths_follow_the_file() {
        let c = Config::parse("[hypervisor]\nkernel = \"k/vmlinux\"\n", Path::new("/etc/kata-rs/configuration.toml")).unwrap();
        assert_eq!(c.hypervisor.kernel, Path::new("/etc/kata-rs/k/vmlinux"));
    }
}

//! The deployment files (Dockerfile, docker-compose.yml, deploy/) checked against the code,
//! without a Docker engine, a cluster or any network service: Compose validates
//! docker-compose.yml (`docker-compose config`); every YAML document parses and names its
//! apiVersion and kind; every `resync`, `fare` and `apisim` command line in them is accepted by
//! the real binary (run with `--help` appended: clap fails on an unknown subcommand, flag or
//! malformed value, and prints the subcommand's usage otherwise); the ports, probes, grace
//! periods, env var names, service configs and autoscaler queue names agree with the CLI's
//! defaults and fare's naming.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fare_config::{Catalog, ServiceConfig};
use serde::Deserialize;
use serde_norway::Value;

/// Where the image keeps the service configs (the Dockerfile's RESYNC_CONFIG_DIR).
const CONFIG_DIR: &str = "/etc/resync/services";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every YAML document of a file; empty documents (a trailing `---`) are dropped.
fn documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: not valid YAML: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The YAML files under deploy/, relative to the workspace root, sorted.
fn deploy_yaml_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("deploy"), &mut files);
    let mut files: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(root()).expect("under root").to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .map(|seq| seq.iter().map(|v| scalar(v).expect("a scalar in a list")).collect())
        .unwrap_or_default()
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A process a deployment file starts from our image.
#[derive(Debug)]
struct Invocation {
    /// `docker-compose.yml service relay`, `deploy/k8s/relay.yaml Deployment/resync-relay`.
    origin: String,
    program: String,
    args: Vec<String>,
    /// The names of the env vars it gets (values where literal).
    env: BTreeMap<String, Option<String>>,
    /// The service configs it sees in CONFIG_DIR, if any are mounted there.
    configs: Option<Catalog>,
    /// The k8s pod template or compose service it comes from.
    source: Value,
}

impl Invocation {
    /// The resync subcommand path, e.g. `["job", "start"]`.
    fn path(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).take_while(|a| is_word(a)).collect()
    }

    fn runs(&self, program: &str, path: &[&str]) -> bool {
        self.program == program && self.path().starts_with(path)
    }

    fn flag(&self, name: &str) -> Option<&str> {
        let position = self.args.iter().position(|a| a == name)?;
        self.args.get(position + 1).map(String::as_str)
    }
}

fn is_word(arg: &str) -> bool {
    arg.starts_with(|c: char| c.is_ascii_lowercase())
        && arg.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The Dockerfile's ENTRYPOINT, CMD and EXPOSEd ports.
struct Dockerfile {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    exposed: BTreeSet<u16>,
}

fn dockerfile() -> Dockerfile {
    let text = read("Dockerfile");
    let json_array = |keyword: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{keyword} ")))
            .unwrap_or_else(|| panic!("Dockerfile: no {keyword}"));
        serde_json::from_str(line[keyword.len()..].trim())
            .unwrap_or_else(|e| panic!("Dockerfile: {keyword} must be a JSON array (exec form): {e}"))
    };
    let exposed = text
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap_or_else(|e| panic!("EXPOSE {p}: {e}")))
        .collect();
    Dockerfile { entrypoint: json_array("ENTRYPOINT"), cmd: json_array("CMD"), exposed }
}

/// The service configs of a directory.
fn load_dir(relative: &str) -> Catalog {
    fare_config::load_dir(&root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The service configs held by a ConfigMap's data.
fn load_config_map(config_map: &Value, origin: &str) -> Catalog {
    let data = at(config_map, &["data"]).and_then(Value::as_mapping).expect("ConfigMap data");
    let services = data
        .iter()
        .map(|(file, text)| {
            let (file, text) = (file.as_str().expect("file name"), text.as_str().expect("file text"));
            fare_config::load_str(file, text).unwrap_or_else(|e| panic!("{origin}: {e}"))
        })
        .collect();
    Catalog::new(services).unwrap_or_else(|e| panic!("{origin}: {e}"))
}

/// Every Kubernetes document under deploy/, with the file it is in.
fn k8s_documents() -> Vec<(String, Value)> {
    deploy_yaml_files()
        .into_iter()
        .filter(|f| f.starts_with("deploy/k8s/"))
        .flat_map(|file| documents(&file).into_iter().map(move |doc| (file.clone(), doc)))
        .collect()
}

fn k8s_named<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, doc)| doc)
        .find(|doc| str_at(doc, &["kind"]) == Some(kind) && str_at(doc, &["metadata", "name"]) == Some(name))
}

/// The containers of every workload under deploy/k8s that run our image.
fn k8s_invocations(docs: &[(String, Value)]) -> Vec<Invocation> {
    let image = dockerfile();
    let mut found = Vec::new();
    for (file, doc) in docs {
        let kind = str_at(doc, &["kind"]).unwrap_or_default();
        let pod = match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => at(doc, &["spec", "template"]),
            "CronJob" => at(doc, &["spec", "jobTemplate", "spec", "template"]),
            _ => None,
        };
        let Some(pod) = pod else { continue };
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
        let volumes = at(pod, &["spec", "volumes"]).and_then(Value::as_sequence).cloned().unwrap_or_default();
        let containers = ["containers", "initContainers"]
            .iter()
            .filter_map(|key| at(pod, &["spec", key]).and_then(Value::as_sequence))
            .flatten();
        for container in containers {
            let image_ref = str_at(container, &["image"]).unwrap_or_default();
            if !image_ref.contains("/resync:") {
                continue;
            }
            let command = strings(container.get("command"));
            let mut argv = if command.is_empty() { image.entrypoint.clone() } else { command };
            let args = strings(container.get("args"));
            argv.extend(if container.get("command").is_none() && args.is_empty() {
                image.cmd.clone()
            } else {
                args
            });
            let mut env = BTreeMap::new();
            for from in container.get("envFrom").and_then(Value::as_sequence).into_iter().flatten() {
                let (kind, name) = if let Some(name) = str_at(from, &["configMapRef", "name"]) {
                    ("ConfigMap", name)
                } else {
                    ("Secret", str_at(from, &["secretRef", "name"]).expect("configMapRef or secretRef"))
                };
                let source = k8s_named(docs, kind, name)
                    .unwrap_or_else(|| panic!("{file} {name}: envFrom {kind} `{name}` is not in deploy/k8s"));
                let data = at(source, &["data"]).or_else(|| at(source, &["stringData"]));
                for (key, value) in data.and_then(Value::as_mapping).into_iter().flatten() {
                    env.insert(key.as_str().expect("key").to_string(), scalar(value));
                }
            }
            for var in container.get("env").and_then(Value::as_sequence).into_iter().flatten() {
                env.insert(
                    str_at(var, &["name"]).expect("env name").to_string(),
                    var.get("value").and_then(scalar),
                );
            }
            let configs = container
                .get("volumeMounts")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .find(|m| str_at(m, &["mountPath"]) == Some(CONFIG_DIR))
                .map(|mount| {
                    let volume = str_at(mount, &["name"]).expect("volume name");
                    let config_map = volumes
                        .iter()
                        .find(|v| str_at(v, &["name"]) == Some(volume))
                        .and_then(|v| str_at(v, &["configMap", "name"]))
                        .unwrap_or_else(|| panic!("{file} {name}: {CONFIG_DIR} is not a ConfigMap volume"));
                    let config_map = k8s_named(docs, "ConfigMap", config_map)
                        .unwrap_or_else(|| panic!("{file}: no ConfigMap `{config_map}` in deploy/k8s"));
                    load_config_map(config_map, file)
                });
            found.push(Invocation {
                origin: format!("{file} {kind}/{name}"),
                program: argv[0].clone(),
                args: argv[1..].to_vec(),
                env,
                configs,
                source: pod.clone(),
            });
        }
    }
    found
}

/// The services of docker-compose.yml built from our Dockerfile.
fn compose_invocations(compose: &Value) -> Vec<Invocation> {
    let image = dockerfile();
    let services = at(compose, &["services"]).and_then(Value::as_mapping).expect("services");
    services
        .iter()
        .filter(|(_, service)| service.get("build").is_some())
        .map(|(name, service)| {
            let name = name.as_str().expect("service name");
            let entrypoint = strings(service.get("entrypoint"));
            let mut argv = if entrypoint.is_empty() { image.entrypoint.clone() } else { entrypoint };
            let command = strings(service.get("command"));
            argv.extend(if command.is_empty() && service.get("entrypoint").is_none() {
                image.cmd.clone()
            } else {
                command
            });
            let env: BTreeMap<String, Option<String>> = service
                .get("environment")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str().expect("env name").to_string(), scalar(v)))
                .collect();
            let configs = strings(service.get("volumes")).iter().find_map(|volume| {
                let (host, rest) = volume.split_once(':')?;
                (rest.trim_end_matches(":ro") == CONFIG_DIR).then(|| load_dir(host.trim_start_matches("./")))
            });
            Invocation {
                origin: format!("docker-compose.yml service {name}"),
                program: argv[0].clone(),
                args: argv[1..].to_vec(),
                env,
                configs,
                source: service.clone(),
            }
        })
        .collect()
}

fn compose() -> Value {
    let mut docs = documents("docker-compose.yml");
    assert_eq!(docs.len(), 1, "docker-compose.yml: one document");
    let mut compose = docs.remove(0);
    // Services extend the shared environment with `<<: *resync-env`, as compose does.
    compose.apply_merge().expect("docker-compose.yml: merge keys");
    compose
}

/// Builds (if needed) a binary of another workspace package with the profile this test was
/// built with, and returns its path. Only `resync` has a CARGO_BIN_EXE_ path here.
fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let resync = Path::new(env!("CARGO_BIN_EXE_resync"));
    let profile = resync.parent().and_then(Path::file_name).and_then(|p| p.to_str()).unwrap_or("debug");
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(root()).args([
        "build",
        "--quiet",
        "--message-format=json",
        "-p",
        package,
        "--bin",
        bin,
    ]);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let output = command.stderr(Stdio::inherit()).output().expect("running cargo build");
    assert!(output.status.success(), "cargo build -p {package} --bin {bin} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo build -p {package} --bin {bin} named no executable"))
}

fn binary(program: &str) -> PathBuf {
    static FARE: OnceLock<PathBuf> = OnceLock::new();
    static APISIM: OnceLock<PathBuf> = OnceLock::new();
    match program {
        "resync" => PathBuf::from(env!("CARGO_BIN_EXE_resync")),
        "fare" => FARE.get_or_init(|| workspace_binary("fare-config", "fare")).clone(),
        "apisim" => APISIM.get_or_init(|| workspace_binary("resync-apisim", "apisim")).clone(),
        other => panic!("`{other}` is not a binary of this workspace (the image has resync, fare, apisim)"),
    }
}

/// `program args... --help`: exits 0 and prints the usage of the subcommand the args name.
fn help(program: &str, args: &[&str]) -> String {
    let output = Command::new(binary(program))
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{program} {} --help` was refused:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The `[default: ...]` of a flag in `--help` output.
fn help_default(help: &str, flag: &str) -> String {
    let start = help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("no {flag} in:\n{help}"));
    let rest = &help[start..];
    let value = rest.find("[default: ").map(|i| &rest[i + "[default: ".len()..]).expect("a default");
    value[..value.find(']').expect("]")].to_string()
}

fn default_port(command: &str) -> u16 {
    let listen = help_default(&help("resync", &[command]), "--listen");
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("--listen {listen}"))
}

/// The port a relay or consumer serves /metrics, /healthz and /readyz on.
fn listen_port(invocation: &Invocation) -> u16 {
    let listen = invocation
        .flag("--listen")
        .map(str::to_string)
        .or_else(|| invocation.env.get("RESYNC_LISTEN").cloned().flatten());
    match listen {
        Some(listen) => listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port"),
        None => default_port(invocation.path()[0]),
    }
}

fn shutdown_grace(invocation: &Invocation) -> Duration {
    let grace = match invocation.flag("--shutdown-grace") {
        Some(grace) => grace.to_string(),
        None => help_default(&help("resync", &["consume"]), "--shutdown-grace"),
    };
    humantime::parse_duration(&grace).unwrap_or_else(|e| panic!("--shutdown-grace {grace}: {e}"))
}

/// The health check the compose services use: no curl in the image, so bash's /dev/tcp.
fn http_check(port: u16, path: &str) -> String {
    format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"
    )
}

fn all_invocations() -> Vec<Invocation> {
    let mut all = compose_invocations(&compose());
    all.extend(k8s_invocations(&k8s_documents()));
    all
}

#[test]
fn every_yaml_document_parses_and_every_manifest_names_its_kind() {
    let compose = compose();
    assert!(at(&compose, &["services"]).and_then(Value::as_mapping).is_some_and(|s| !s.is_empty()));
    let files = deploy_yaml_files();
    assert!(files.iter().any(|f| f.starts_with("deploy/k8s/keda/")), "no KEDA manifests: {files:?}");
    let mut seen = BTreeSet::new();
    for file in files.iter().filter(|f| f.starts_with("deploy/k8s/")) {
        let docs = documents(file);
        assert!(!docs.is_empty(), "{file}: no documents");
        for doc in docs {
            let api_version = str_at(&doc, &["apiVersion"])
                .unwrap_or_else(|| panic!("{file}: a document has no apiVersion"));
            let kind = str_at(&doc, &["kind"]).unwrap_or_else(|| panic!("{file}: a document has no kind"));
            if kind == "Kustomization" {
                for resource in strings(doc.get("resources")) {
                    let path = Path::new(file).parent().expect("dir").join(&resource);
                    assert!(root().join(&path).is_file(), "{file}: resource {resource} does not exist");
                }
                continue;
            }
            let name = str_at(&doc, &["metadata", "name"])
                .unwrap_or_else(|| panic!("{file}: {kind} without a name"));
            assert!(
                at(&doc, &["metadata", "namespace"]).is_none(),
                "{file}: {kind}/{name} names a namespace; the manifests are namespace-agnostic"
            );
            if api_version.starts_with("keda.sh/") {
                assert_eq!(api_version, "keda.sh/v1alpha1", "{file}: {kind}/{name}: KEDA v2 API");
            }
            // The two KEDA files are alternatives and share names; elsewhere names are unique.
            if !file.starts_with("deploy/k8s/keda/") {
                assert!(seen.insert(format!("{kind}/{name}")), "{file}: {kind}/{name} is defined twice");
            }
        }
    }
}

#[test]
fn every_command_line_is_accepted_by_the_real_binary() {
    let all = all_invocations();
    for program in ["resync", "fare", "apisim"] {
        assert!(all.iter().any(|i| i.program == program), "no deployment file runs {program}");
    }
    for invocation in &all {
        let args: Vec<&str> = invocation.args.iter().map(String::as_str).collect();
        let stdout = help(&invocation.program, &args);
        let usage = std::iter::once(invocation.program.as_str())
            .chain(invocation.path())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            stdout.contains(&format!("Usage: {usage}")),
            "{}: `{} {}` is not the command it looks like; --help printed:\n{stdout}",
            invocation.origin,
            invocation.program,
            args.join(" ")
        );
    }
    // What the deployments must run at all.
    for (program, path) in [
        ("resync", &["migrate"][..]),
        ("fare", &["apply"][..]),
        ("resync", &["relay"][..]),
        ("resync", &["consume"][..]),
        ("resync", &["job", "start"][..]),
    ] {
        for origin in ["docker-compose.yml", "deploy/k8s/"] {
            assert!(
                all.iter().any(|i| i.origin.starts_with(origin) && i.runs(program, path)),
                "{origin}: nothing runs `{program} {}`",
                path.join(" ")
            );
        }
    }
}

#[test]
fn env_vars_are_ones_resync_reads_and_sinks_get_their_secrets() {
    // Every RESYNC_* name the code reads, as a string literal in a crate's src/.
    let mut read_by_code = BTreeSet::new();
    for text in crate_sources() {
        for piece in text.split("\"RESYNC_").skip(1) {
            if let Some(end) = piece.find('"') {
                read_by_code.insert(format!("RESYNC_{}", &piece[..end]));
            }
        }
    }
    assert!(read_by_code.contains("RESYNC_DATABASE_URL"), "{read_by_code:?}");
    for invocation in all_invocations() {
        if let Some(Some(namespace)) = invocation.env.get("RESYNC_NAMESPACE") {
            fare_config::check_namespace(namespace).unwrap_or_else(|e| panic!("{}: {e}", invocation.origin));
        }
        for name in invocation.env.keys().filter(|n| n.starts_with("RESYNC_")) {
            assert!(
                read_by_code.contains(name),
                "{}: env var {name} is read by no resync code (known: {read_by_code:?})",
                invocation.origin
            );
        }
        let reads_configs = invocation.program == "fare"
            || invocation.runs("resync", &["consume"])
            || invocation.runs("resync", &["job", "start"])
            || invocation.runs("resync", &["job", "verify"]);
        if reads_configs {
            assert_eq!(
                invocation.env.get("RESYNC_CONFIG_DIR").map(|v| v.as_deref()),
                Some(Some(CONFIG_DIR)),
                "{}: RESYNC_CONFIG_DIR",
                invocation.origin
            );
            assert!(
                invocation.configs.is_some(),
                "{}: no service configs mounted at {CONFIG_DIR}",
                invocation.origin
            );
        }
        if invocation.runs("resync", &["consume"]) {
            let name = invocation.flag("--service").expect("--service");
            let configs = invocation.configs.as_ref().expect("configs");
            let service =
                configs.service(name).unwrap_or_else(|| panic!("{}: no service `{name}`", invocation.origin));
            let sink = service
                .sink
                .as_ref()
                .unwrap_or_else(|| panic!("{}: `{name}` has no [sink]", invocation.origin));
            for value in sink.headers.values() {
                for piece in value.split("${").skip(1) {
                    let var = &piece[..piece.find('}').expect("}")];
                    assert!(
                        invocation.env.contains_key(var),
                        "{}: the sink of `{name}` reads ${{{var}}}, which the container does not get",
                        invocation.origin
                    );
                }
            }
        }
    }
}

#[test]
fn ports_probes_and_grace_periods_match_the_cli() {
    let relay_port = default_port("relay");
    let consume_port = default_port("consume");
    assert_eq!(
        dockerfile().exposed,
        BTreeSet::from([relay_port, consume_port]),
        "Dockerfile EXPOSE must be the relay's and the consumer's default --listen ports"
    );
    let mut checked = 0;
    for invocation in all_invocations() {
        let serves_health = invocation.runs("resync", &["relay"]) || invocation.runs("resync", &["consume"]);
        if !serves_health {
            continue;
        }
        checked += 1;
        let port = listen_port(&invocation);
        let origin = &invocation.origin;
        let source = &invocation.source;
        if origin.starts_with("docker-compose.yml") {
            assert!(strings(source.get("expose")).contains(&port.to_string()), "{origin}: expose {port}");
            assert_eq!(
                strings(at(source, &["healthcheck", "test"])),
                ["CMD", "bash", "-c", &http_check(port, "/readyz")],
                "{origin}: health check"
            );
            if invocation.runs("resync", &["consume"]) {
                assert!(source.get("container_name").is_none(), "{origin}: container_name stops --scale");
                assert!(source.get("ports").is_none(), "{origin}: a host port stops --scale");
                let stop = str_at(source, &["stop_grace_period"]).expect("stop_grace_period");
                let stop = humantime::parse_duration(stop).expect("stop_grace_period");
                assert!(stop > shutdown_grace(&invocation), "{origin}: stop_grace_period {stop:?}");
            }
        } else {
            let container = at(source, &["spec", "containers"])
                .and_then(Value::as_sequence)
                .and_then(|c| c.first())
                .expect("a container");
            let port_name = container
                .get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .find(|p| p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(port)))
                .and_then(|p| str_at(p, &["name"]))
                .unwrap_or_else(|| panic!("{origin}: no named containerPort {port}"));
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                assert_eq!(str_at(container, &[probe, "httpGet", "path"]), Some(path), "{origin}: {probe}");
                let probe_port = at(container, &[probe, "httpGet", "port"]).and_then(scalar);
                assert!(
                    probe_port.as_deref() == Some(port_name) || probe_port == Some(port.to_string()),
                    "{origin}: {probe} port {probe_port:?}"
                );
            }
            assert_eq!(
                str_at(source, &["metadata", "annotations", "prometheus.io/port"]),
                Some(port.to_string().as_str()),
                "{origin}: prometheus.io/port"
            );
            if invocation.runs("resync", &["consume"]) {
                let grace = at(source, &["spec", "terminationGracePeriodSeconds"]).and_then(Value::as_u64);
                let shutdown = shutdown_grace(&invocation).as_secs();
                assert!(
                    grace.is_some_and(|g| g > shutdown),
                    "{origin}: terminationGracePeriodSeconds {grace:?}"
                );
                assert!(
                    at(container, &["resources", "limits", "memory"]).is_some(),
                    "{origin}: a consumer needs a memory limit"
                );
            }
        }
    }
    assert!(checked >= 4, "relay and consumer in compose and k8s: {checked}");
}

#[test]
fn the_compose_health_check_speaks_http_to_a_real_server() {
    let compose = compose();
    let apisim = at(&compose, &["services", "apisim"]).expect("apisim service");
    assert_eq!(strings(apisim.get("command")), ["--listen", "0.0.0.0:8088"]);
    assert_eq!(
        strings(at(apisim, &["healthcheck", "test"])),
        ["CMD", "bash", "-c", &http_check(8088, "/admin/stats")]
    );
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut server = Command::new(binary("apisim"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start apisim");
    let check = |path: &str| {
        Command::new("bash")
            .args(["-c", &http_check(port, path)])
            .stderr(Stdio::null())
            .status()
            .expect("bash")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check("/admin/stats").success() {
        assert!(Instant::now() < deadline, "the health check never passed against apisim on :{port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let not_found = check("/no-such-path");
    let _ = server.kill();
    let _ = server.wait();
    assert!(!not_found.success(), "the health check must fail on a non-200 answer");
    assert!(!check("/admin/stats").success(), "the health check must fail when nothing listens");
}

#[test]
fn service_configs_load_and_match_the_examples() {
    let examples = load_dir("examples/services");
    let comparable = |service: &ServiceConfig| {
        let mut service = service.clone();
        service.source_file = PathBuf::new();
        if let Some(sink) = &mut service.sink {
            sink.url = String::new();
        }
        service
    };
    let docs = k8s_documents();
    let config_map = k8s_named(&docs, "ConfigMap", "resync-services").expect("ConfigMap resync-services");
    for (origin, catalog) in [
        ("deploy/compose/services", load_dir("deploy/compose/services")),
        ("ConfigMap resync-services", load_config_map(config_map, "deploy/k8s")),
    ] {
        for service in &catalog.services {
            let example = examples
                .service(&service.name)
                .unwrap_or_else(|| panic!("{origin}: `{}` is not in examples/services", service.name));
            assert_eq!(
                comparable(service),
                comparable(example),
                "{origin}: `{}` drifted from the example",
                service.name
            );
        }
    }
}

#[test]
fn secrets_are_placeholders_and_the_emulator_matches_the_scripts() {
    for doc in documents("deploy/k8s/secret.template.yaml") {
        assert!(doc.get("data").is_none(), "secret template: use stringData, visible placeholders");
        let data = at(&doc, &["stringData"]).and_then(Value::as_mapping).expect("stringData");
        for (key, value) in data {
            let value = value.as_str().expect("string");
            assert!(
                value.contains("REPLACE_ME"),
                "secret template: {key:?} must be a REPLACE_ME placeholder"
            );
        }
    }
    let script = read("scripts/services-up");
    let moto = script
        .split("RESYNC_MOTO_VERSION:-")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("MOTO_VERSION in scripts/services-up");
    assert_eq!(
        str_at(&compose(), &["services", "sns-sqs", "image"]),
        Some(format!("motoserver/moto:{moto}").as_str()),
        "docker-compose.yml runs another moto than scripts/services-up installs"
    );
}

#[test]
fn autoscalers_target_the_consumers_queues() {
    let docs = k8s_documents();
    let consumers: Vec<Invocation> =
        k8s_invocations(&docs).into_iter().filter(|i| i.runs("resync", &["consume"])).collect();
    let env = k8s_named(&docs, "ConfigMap", "resync-env").expect("ConfigMap resync-env");
    let mut scaled = 0;
    for (file, doc) in docs.iter().filter(|(_, d)| str_at(d, &["kind"]) == Some("ScaledObject")) {
        scaled += 1;
        let target = str_at(doc, &["spec", "scaleTargetRef", "name"]).expect("scaleTargetRef.name");
        let consumer = consumers
            .iter()
            .find(|c| c.origin.ends_with(&format!("Deployment/{target}")))
            .unwrap_or_else(|| panic!("{file}: no consumer Deployment `{target}`"));
        let name = consumer.flag("--service").expect("--service");
        let service = consumer.configs.as_ref().and_then(|c| c.service(name)).expect("the consumed service");
        let namespace = str_at(env, &["data", "RESYNC_NAMESPACE"]);
        let queues: BTreeSet<String> = service.queues(namespace).into_iter().map(|(_, q)| q.name).collect();
        let min = at(doc, &["spec", "minReplicaCount"]).and_then(Value::as_u64).expect("minReplicaCount");
        let max = at(doc, &["spec", "maxReplicaCount"]).and_then(Value::as_u64).expect("maxReplicaCount");
        assert!(0 < min && min < max, "{file}: replicas {min}..{max}");
        let mut triggered = BTreeSet::new();
        for trigger in at(doc, &["spec", "triggers"]).and_then(Value::as_sequence).expect("triggers") {
            let metadata = trigger.get("metadata").expect("metadata");
            let queue = match str_at(trigger, &["type"]).expect("type") {
                "aws-sqs-queue" => {
                    for key in ["queueLength", "awsRegion"] {
                        assert!(metadata.get(key).is_some(), "{file}: aws-sqs-queue needs {key}");
                    }
                    str_at(metadata, &["queueURL"])
                        .expect("queueURL")
                        .rsplit('/')
                        .next()
                        .expect("name")
                        .to_string()
                }
                "rabbitmq" => {
                    assert_eq!(str_at(metadata, &["mode"]), Some("QueueLength"), "{file}");
                    assert!(metadata.get("value").is_some(), "{file}: rabbitmq needs value");
                    let host = str_at(metadata, &["hostFromEnv"]).expect("hostFromEnv");
                    assert!(consumer.env.contains_key(host), "{file}: the consumer has no env var {host}");
                    str_at(metadata, &["queueName"]).expect("queueName").to_string()
                }
                other => panic!("{file}: unexpected trigger {other}"),
            };
            assert!(queues.contains(&queue), "{file}: `{queue}` is not a queue of `{name}` ({queues:?})");
            triggered.insert(queue);
            if let Some(auth) = str_at(trigger, &["authenticationRef", "name"]) {
                let defined = docs.iter().any(|(f, d)| {
                    f == file
                        && str_at(d, &["kind"]) == Some("TriggerAuthentication")
                        && str_at(d, &["metadata", "name"]) == Some(auth)
                });
                assert!(defined, "{file}: TriggerAuthentication {auth} is not in the file");
            }
        }
        assert_eq!(triggered, queues, "{file}: a trigger per queue the consumer takes from");
    }
    assert_eq!(scaled, 2, "one ScaledObject per broker");
}

#[test]
fn the_shipped_binaries_do_not_link_the_demo_the_api_simulator_or_test_support() {
    // What the image ships (resync, fare) is what runs in production: the demo, the simulator
    // and test support are built into binaries of their own.
    for package in ["resync-cli", "fare-config"] {
        let output = Command::new(env!("CARGO"))
            .current_dir(root())
            .args(["tree", "--locked", "--offline", "-e", "normal", "--prefix", "none", "-p", package])
            .output()
            .expect("running cargo tree");
        assert!(
            output.status.success(),
            "cargo tree -p {package}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let tree = String::from_utf8_lossy(&output.stdout);
        for unwanted in ["resync-demo ", "resync-apisim ", "resync-testkit "] {
            assert!(!tree.contains(unwanted), "{package} links {unwanted}:\n{tree}");
        }
    }
}

/// Names of the metrics the code exports: every `counter!`, `gauge!` and `histogram!` of a
/// `resync_` metric in the crates' sources.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for text in crate_sources() {
        for macro_call in ["counter!(", "gauge!(", "histogram!("] {
            for piece in text.split(macro_call).skip(1) {
                let piece = piece.trim_start().trim_start_matches('"');
                let metric: String =
                    piece.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if metric.starts_with("resync_") {
                    names.insert(metric);
                }
            }
        }
    }
    names
}

/// The text of every `.rs` file under a crate's `src/` (not tests, deploy or build output).
fn crate_sources() -> Vec<String> {
    fn scan(dir: &Path, texts: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() && !["target", ".git", "deploy", "tests"].contains(&name) {
                scan(&path, texts);
            } else if name.ends_with(".rs") && path.components().any(|c| c.as_os_str() == "src") {
                texts.push(std::fs::read_to_string(&path).expect("source"));
            }
        }
    }
    let mut texts = Vec::new();
    scan(root(), &mut texts);
    texts
}

/// The `resync_` metric names a PromQL expression reads (histogram series by their metric).
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .filter(|word| word.starts_with("resync_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_and_the_alert_rules_query_only_metrics_the_code_exports() {
    let exported = exported_metrics();
    assert!(exported.contains("resync_sink_circuit_open_seconds"), "{exported:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/resync.json")).expect("the dashboard is JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expr").to_string();
            queries.push((format!("dashboard panel {:?}", panel["title"]), expr));
        }
    }
    for group in documents("deploy/prometheus/alerts.yml")[0]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = str_at(rule, &["expr"]).expect("expr").to_string();
            queries.push((format!("alert {}", str_at(rule, &["alert"]).expect("alert name")), expr));
        }
    }
    assert!(queries.len() > 10, "{queries:?}");
    for (origin, expr) in &queries {
        let read = metrics_in(expr);
        assert!(!read.is_empty(), "{origin}: `{expr}` reads no resync metric");
        for metric in read {
            assert!(exported.contains(&metric), "{origin}: `{metric}` is not a metric resync exports");
        }
    }
}

#[test]
fn the_shipped_alert_rules_pass_their_promtool_tests() {
    let dir = root().join("deploy/prometheus");
    let output = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}; install it with `apt-get install prometheus` (scripts/services-up does)")
        });
    assert!(
        output.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Compose itself accepts docker-compose.yml (Debian's `docker-compose` validates without a
/// Docker engine): as it is, on SNS/SQS, and with the `job` profile.
#[test]
fn docker_compose_validates_the_compose_file_in_each_setup() {
    type Flags = &'static [&'static str];
    type Env = &'static [(&'static str, &'static str)];
    let setups: [(Flags, Env); 3] =
        [(&[], &[]), (&[], &[("RESYNC_TRANSPORT", "sns-sqs")]), (&["--profile", "job"], &[])];
    for (flags, env) in setups {
        let output = Command::new("docker-compose")
            .args(["-f", "docker-compose.yml"])
            .args(flags)
            .args(["config", "--quiet"])
            .envs(env.iter().copied())
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| {
                panic!("docker-compose: {e}; install it with `apt-get install docker-compose` (scripts/services-up does)")
            });
        assert!(
            output.status.success(),
            "docker-compose config {flags:?} {env:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `scripts/services-up --plan` on machines that lack the services: what it would install, as
/// root or through sudo, and, where it cannot install, what to run by hand. A PATH of stub
/// commands stands in for each machine; nothing is installed or started.
#[test]
fn services_up_installs_only_what_is_missing_and_says_how_when_it_cannot() {
    let services = ["pg_ctlcluster", "redis-server", "rabbitmq-server"];
    /// The commands a machine has, its user id, and the lines the plan prints or the error.
    type Machine = (&'static [&'static str], &'static str, Result<&'static [&'static str], &'static str>);
    let cases: [Machine; 5] = [
        (
            &["apt-get"],
            "0",
            Ok(&[
                "PostgreSQL: not installed; installing it now (apt-get install postgresql)",
                "Redis: not installed; installing it now (apt-get install redis-server)",
                "RabbitMQ: not installed; installing it now (apt-get install rabbitmq-server)",
            ]),
        ),
        (
            &["apt-get", "sudo"],
            "1000",
            Ok(&["PostgreSQL: not installed; installing it now (sudo apt-get install postgresql)"]),
        ),
        (&["apt-get", "pg_ctlcluster", "redis-server", "rabbitmq-server"], "0", Ok(&[])),
        (&[], "0", Err("PostgreSQL is not installed and there is no apt-get: install postgresql")),
        (&["apt-get"], "1000", Err("PostgreSQL is not installed: run `sudo apt-get install postgresql`")),
    ];
    for (has, uid, expected) in cases {
        let dir = std::env::temp_dir().join(resync_testkit::unique_name("machine"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("stub dir");
        for tool in ["env", "bash", "mkdir"] {
            let real = which(tool);
            std::os::unix::fs::symlink(&real, bin.join(tool)).expect("link a real tool");
        }
        let stub = |name: &str, body: &str| {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("stub");
            let mut permissions = std::fs::metadata(&path).expect("stub").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
            std::fs::set_permissions(&path, permissions).expect("chmod stub");
        };
        stub("id", &format!("echo {uid}"));
        for tool in has {
            stub(tool, "exit 0");
        }
        let output = Command::new(root().join("scripts/services-up"))
            .arg("--plan")
            .env_clear()
            .env("PATH", &bin)
            .env("HOME", &dir)
            .env("RESYNC_CACHE_DIR", dir.join("cache"))
            .output()
            .expect("run scripts/services-up --plan");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let machine = format!("a machine with {has:?}, uid {uid}:\n{stdout}{stderr}");
        match expected {
            Ok(lines) => {
                assert!(output.status.success(), "{machine}");
                for line in lines {
                    assert!(stdout.contains(line), "{machine}\nmissing: {line}");
                }
                let installs = stdout.matches("installing it now").count();
                let missing = services.iter().filter(|s| !has.contains(s)).count();
                assert_eq!(installs, missing, "{machine}");
            }
            Err(message) => {
                assert!(!output.status.success(), "{machine}");
                assert!(stderr.contains(message), "{machine}\nmissing: {message}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Where `tool` lives on this machine.
fn which(tool: &str) -> PathBuf {
    let output = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("sh");
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

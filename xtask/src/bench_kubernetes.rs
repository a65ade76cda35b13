//! `cargo xtask bench-kubernetes`: the agent's Kubernetes source at scale — how long an
//! EndpointSlice change takes to reach real connects, and what the agent costs in memory
//! and CPU while it watches 10,000 FailoverServices with 100,000 endpoints.
//!
//! One real control plane (etcd + kube-apiserver from `KUBEBUILDER_ASSETS`, prepared as
//! `cargo xtask test` does) is the agent's own cluster, `kind1`. It holds, per service,
//! a headless backing Service and its EndpointSlice, a FailoverService on its own
//! `spec.virtualIP` whose ordered backing services are that Service in `kind1`, `kind2`
//! and `kind3`, and the slices `detour controller` would mirror from the two remote
//! clusters (its labels, names, ports and namespace), written directly: no remote API
//! server runs, since the agent only ever watches its own. A service's endpoints are
//! dealt round-robin over the three clusters. Objects are created concurrently and the
//! loading time is reported.
//!
//! The agent then starts (`detour agent --kubernetes`) in the bench's own cgroup and pin
//! directory; the time to its first sync is when it logs the first Kubernetes
//! "configuration reloaded" (the maps written). Once settled, its resident memory
//! (`VmRSS`) is read and its CPU at rest (`utime + stime`) over `--rest`, with nothing
//! changing and nothing connecting; then `/metrics` is scraped once, as Prometheus
//! would, and RSS read again (a scrape's memory stays with the allocator). Then a client in the bench cgroup connects to the
//! FailoverService `bench`'s VIP back to back while the task moves `bench`'s single
//! endpoint between two accept-and-drop listeners by server-side applying its
//! EndpointSlice. The latency of a change is from just before the PATCH is sent to the
//! first connection the new listener accepts: the API server's write, the watch event,
//! the agent's model and map update, and one connect.
//!
//! Invariants:
//! - the listeners are in a network namespace of the task's own (10.231.79.2 and .3
//!   behind a veth, 10.231.79.1 on the host side): the API server refuses loopback
//!   endpoint addresses. Filler VIPs are loopback (127.235.0.0/16, `bench` 127.234.0.1)
//!   and filler endpoints are in 10.200.0.0/14; health checks are disabled and nothing
//!   connects to a filler, so no packet for those addresses is ever sent;
//! - backing Services are headless (`clusterIP: None`), so nothing takes a ClusterIP;
//! - every wait is bounded; the control plane, agent, cgroup, pins, network namespace and
//!   listeners are guards, removed pass or fail (the agent's log is kept under
//!   `target/bench-kubernetes/`);
//! - `DETOUR_BENCH_AGENT`, when set, is run instead of the freshly built `detour`: a
//!   wrapper that `exec`s it (so the PID the task measures and signals stays the
//!   agent's) under a profiler, e.g. with heaptrack's `LD_PRELOAD` library, as
//!   `docs/benchmarks.md` describes;
//! - the task measures the agent as it is: it never tunes it; a connect that fails
//!   during the changes (the agent destroys sockets to a removed backend, and one may
//!   still be in its handshake) is counted and reported, not hidden.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use detour_testbed::k8s::{Cluster, ClusterOptions};
use detour_testbed::{Agent, AgentBed, Netns};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

use crate::bench::{median, thousands, wait_in_table, AcceptSink};
use crate::bench_reload::ReloadClient;
use detour_testbed::k8s::scale::{
    bench_objects, bench_slice, filler_objects, BENCH, BENCH_VIP, LOCAL_CLUSTER, MIRROR_NAMESPACE,
    NAMESPACE, REGION, SERVICE_PORT, TARGET_PORT, ZONE,
};

use crate::{cmd, k8s_assets, setup};

/// The CRD as `deploy/` ships it.
const CRD: &str = include_str!("../../deploy/crds/failoverservice.yaml");
const CRD_NAME: &str = "failoverservices.failover.detour.io";
const NODE: &str = "bench-node";
/// The host end of the veth, and the two listeners inside the namespace.
const HOST_ADDR: &str = "10.231.79.1/24";
const LISTENER_A: Ipv4Addr = Ipv4Addr::new(10, 231, 79, 2);
const LISTENER_B: Ipv4Addr = Ipv4Addr::new(10, 231, 79, 3);
/// The field manager of the task's server-side applies.
const MANAGER: &str = "detour-bench";
/// The longest one change may take before the run is abandoned.
const CHANGE_BUDGET: Duration = Duration::from_secs(120);
/// Bound on the agent's first sync.
const SYNC_BUDGET: Duration = Duration::from_secs(600);
/// Most endpoints `--max-backends`' default leaves room for, with margin.
const MAX_ENDPOINTS: u32 = 200_000;

#[derive(clap::Args)]
pub struct KubernetesArgs {
    /// FailoverServices (`bench` included) x endpoints per filler service, the endpoints
    /// dealt over the three clusters; e.g. 100x10 for a quick run.
    #[arg(long, default_value = "10000x10", value_parser = parse_setup)]
    setup: (u32, u32),
    /// EndpointSlice changes measured.
    #[arg(long, default_value_t = 50)]
    changes: u32,
    /// Create requests in flight while loading the control plane.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// How long the agent is left alone after its first sync before memory is read.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    settle: Duration,
    /// How long CPU at rest is measured over.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    rest: Duration,
    /// Pause after each change reached connects, before the next.
    #[arg(long, default_value = "200ms", value_parser = crate::parse_duration)]
    pause: Duration,
}

fn parse_setup(s: &str) -> Result<(u32, u32)> {
    let (services, endpoints) = s
        .split_once('x')
        .with_context(|| format!("{s:?}: expected SERVICESxENDPOINTS, e.g. 10000x10"))?;
    let services: u32 = services.parse().context("services")?;
    let endpoints: u32 = endpoints.parse().context("endpoints")?;
    if !(1..=60_000).contains(&services)
        || !(1..=30).contains(&endpoints)
        || services * endpoints > MAX_ENDPOINTS
    {
        bail!(
            "{s:?}: services must be 1..=60000, endpoints 1..=30, and at most {} endpoints in all",
            thousands(f64::from(MAX_ENDPOINTS))
        );
    }
    Ok((services, endpoints))
}

/// What one run measured.
struct Measured {
    services: u32,
    endpoints: u32,
    objects: u64,
    load: Duration,
    first_sync: Duration,
    agent_sync_ms: Option<f64>,
    latencies: Vec<Duration>,
    /// When each PATCH was sent (wall clock, to line up with the agent's log).
    sent_at: Vec<SystemTime>,
    /// From sending each PATCH to the API server's answer.
    acked: Vec<Duration>,
    /// `total_ms` of the agent's reloads after the first sync.
    agent_reload_ms: Vec<f64>,
    /// From sending each PATCH to the agent's loop taking the new model (the API
    /// server's write, the watch event, the model build), when the log has one reload
    /// per change.
    to_agent_ms: Vec<f64>,
    rss_settled_mib: f64,
    /// One scrape of `/metrics` after settling, and RSS after it.
    scrape: String,
    rss_after_mib: f64,
    rss_peak_mib: f64,
    /// VmRSS after each change (and its pause).
    rss_trace: Vec<f64>,
    cpu_rest: f64,
    rest: Duration,
    client: String,
}

pub fn run(args: &KubernetesArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench-kubernetes")?;
    if args.changes < 2 {
        bail!("--changes must be at least 2");
    }
    setup::run()?;
    if let Some(dir) = k8s_assets::prepare()? {
        // This process starts the control plane itself: the testbed reads the variable.
        std::env::set_var(detour_testbed::k8s::ASSETS_ENV, dir);
    }
    let mut binary = cmd::build_agent()?;
    if let Some(wrapper) = std::env::var_os("DETOUR_BENCH_AGENT") {
        binary = wrapper.into();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (services, endpoints) = args.setup;
    eprintln!("bench-kubernetes: {services} FailoverServices x {endpoints} endpoints");
    let measured = measure(&rt, &binary, args)?;
    print!("{}", report(&measured, args.changes));
    Ok(())
}

fn measure(rt: &tokio::runtime::Runtime, binary: &Path, args: &KubernetesArgs) -> Result<Measured> {
    let (services, endpoints) = args.setup;
    let cluster = rt.block_on(Cluster::start_with(
        LOCAL_CLUSTER,
        ClusterOptions::default(),
    ))?;
    let client = cluster.client();

    // The listeners first: a failure there should not cost a whole load.
    let netns = Netns::new()?;
    let veth = netns.veth(HOST_ADDR, &format!("{LISTENER_A}/24"))?;
    netns.ip(&[
        "addr",
        "add",
        &format!("{LISTENER_B}/24"),
        "dev",
        veth.peer_name(),
    ])?;
    let a = netns.run_in(|| AcceptSink::start(SocketAddr::from((LISTENER_A, TARGET_PORT))))??;
    let b = netns.run_in(|| AcceptSink::start(SocketAddr::from((LISTENER_B, TARGET_PORT))))??;

    let loading = Instant::now();
    let objects = rt
        .block_on(load(&client, services, endpoints, args.concurrency))
        .with_context(|| format!("loading the control plane\n{}", cluster.logs()))?;
    let load = loading.elapsed();
    eprintln!(
        "  loaded {} objects in {:.1} s",
        thousands(objects as f64),
        load.as_secs_f64()
    );

    // The bed's guards: the agent, then the pins (detaching), the cgroup, the temp dir.
    let bed = AgentBed::new(binary)?;
    let log = bed.log_path();
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let started = Instant::now();
    // No `--config`: the agent's source is the control plane.
    let mut options = bed.options();
    options.config = PathBuf::new();
    let mut agent = Agent::start_with_args(
        options,
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            NODE,
            "--cluster-name",
            LOCAL_CLUSTER,
        ],
    )?;
    let result = (|| -> Result<Measured> {
        agent.wait_ready(SYNC_BUDGET)?;
        let first_sync = wait_first_sync(&agent, &log, started)?;
        eprintln!("  first sync in {:.1} s", first_sync.as_secs_f64());
        let bench_name = format!("{BENCH}.{NAMESPACE}");
        wait_in_table(
            &agent,
            &bench_name,
            Instant::now() + Duration::from_secs(60),
        )?;
        let served = served_services(&agent)?;
        if served != services as usize {
            bail!(
                "the agent serves {served} services, expected {services}{}",
                agent.log_tail()
            );
        }
        let pid = agent.pid().context("agent pid")?;
        thread::sleep(args.settle);
        let rss_settled_mib = proc_status_mib(pid, "VmRSS")?;
        let cpu_rest = cpu_seconds(pid, args.rest)? / args.rest.as_secs_f64();
        eprintln!(
            "  settled: RSS {rss_settled_mib:.1} MiB, CPU at rest {:.2} % of a core",
            cpu_rest * 100.0
        );
        // What a node that Prometheus scrapes pays: one scrape, then RSS again.
        let scrape = scrape_metrics(&agent)?;
        let rss_scraped_mib = proc_status_mib(pid, "VmRSS")?;
        let scrape = format!(
            "one scrape of /metrics: {} series, {:.1} MiB of text in {} ms; RSS after it {rss_scraped_mib:.1} MiB",
            thousands(scrape.series as f64),
            scrape.bytes as f64 / (1024.0 * 1024.0),
            scrape.took.as_millis(),
        );
        eprintln!("  {scrape}");

        let target = SocketAddr::from((BENCH_VIP, SERVICE_PORT)).to_string();
        let connects = ReloadClient::spawn(
            &bed.cgroup,
            &target,
            bed.dir.join("stop-client"),
            args.changes,
        )?;
        wait_until_accepts(&a, Duration::from_secs(10))?;
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
        let mut latencies = Vec::new();
        let mut sent_at = Vec::new();
        let mut acked = Vec::new();
        let mut rss_trace = Vec::new();
        for change in 0..args.changes {
            let (to, sink) = if change % 2 == 0 {
                (LISTENER_B, &b)
            } else {
                (LISTENER_A, &a)
            };
            let slice: EndpointSlice = serde_json::from_value(bench_slice(to))?;
            let api = slices.clone();
            let before = sink.accepted();
            sent_at.push(SystemTime::now());
            let started = Instant::now();
            let patch = rt.spawn(async move {
                let result = api
                    .patch(
                        BENCH,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&slice),
                    )
                    .await;
                (result, started.elapsed())
            });
            while sink.accepted() == before {
                if started.elapsed() > CHANGE_BUDGET {
                    bail!(
                        "change {change} did not reach {to} within {CHANGE_BUDGET:?}{}",
                        agent.log_tail()
                    );
                }
                thread::sleep(Duration::from_micros(200));
            }
            let latency = started.elapsed();
            let (result, ack) = rt.block_on(patch)?;
            result.with_context(|| format!("change {change}: applying the bench slice"))?;
            acked.push(ack);
            latencies.push(latency);
            thread::sleep(args.pause);
            // Whether memory grows with every change or levels off.
            let rss = proc_status_mib(pid, "VmRSS")?;
            eprintln!(
                "  change {change:>2}: {:.1} ms (RSS {rss:.1} MiB)",
                latency.as_secs_f64() * 1e3
            );
            rss_trace.push(rss);
        }
        let rss_after_mib = proc_status_mib(pid, "VmRSS")?;
        let rss_peak_mib = proc_status_mib(pid, "VmHWM")?;
        // A failed connect is reported, not fatal: with `terminateConnections` (the
        // default) the agent destroys the sockets to a removed backend, and a connect
        // that is still in its handshake then fails with ECONNABORTED — the agent's
        // documented behaviour, which the latency figures do not depend on.
        let summary = connects.finish()?;
        let client_summary = format!(
            "{} connects, {} failed{}",
            thousands(summary.ok as f64),
            summary.failed,
            summary
                .first_error
                .map_or_else(String::new, |e| format!(" (first: {e})"))
        );
        Ok(Measured {
            services,
            endpoints,
            objects,
            load,
            first_sync,
            agent_sync_ms: None,
            latencies,
            sent_at,
            acked,
            agent_reload_ms: Vec::new(),
            to_agent_ms: Vec::new(),
            rss_settled_mib,
            scrape,
            rss_after_mib,
            rss_peak_mib,
            rss_trace,
            cpu_rest,
            rest: args.rest,
            client: client_summary,
        })
    })();
    agent.stop()?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Kept for a closer look: the temp dir goes away with the task.
    let kept = cmd::target_dir().join("bench-kubernetes");
    if std::fs::create_dir_all(&kept).is_ok() {
        let _ = std::fs::write(
            kept.join(format!("agent-{services}x{endpoints}.log")),
            &text,
        );
    }
    let mut measured = result?;
    measured.agent_sync_ms = first_sync_ms(&text);
    // The first Kubernetes reload is the first sync; the others are the changes.
    let reloads: Vec<Reload> = kubernetes_reloads(&text).into_iter().skip(1).collect();
    measured.agent_reload_ms = reloads.iter().map(|r| r.total_ms).collect();
    measured.to_agent_ms = to_agent_ms(&measured.sent_at, &reloads);
    Ok(measured)
}

/// Creates the CRD, the namespaces, the agent's Node and every service's objects, at
/// most `concurrency` requests in flight; returns how many objects it created.
async fn load(
    client: &kube::Client,
    services: u32,
    endpoints: u32,
    concurrency: u32,
) -> Result<u64> {
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(CRD).context("parsing deploy/crds/failoverservice.yaml")?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .context("creating the FailoverService CRD")?;
    for namespace in [NAMESPACE, MIRROR_NAMESPACE] {
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
    }
    let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE, "labels": {
        "topology.kubernetes.io/region": REGION,
        "topology.kubernetes.io/zone": ZONE,
    }}}))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .context("creating the agent's Node")?;
    wait_established(&crds).await?;
    // The bench slice by server-side apply, as every change writes it after.
    let slice: EndpointSlice = serde_json::from_value(bench_slice(LISTENER_A))?;
    Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE)
        .patch(
            BENCH,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&slice),
        )
        .await
        .context("applying the bench slice")?;

    let objects = bench_objects()
        .into_iter()
        .chain((1..services).flat_map(|i| filler_objects(i, endpoints)));
    let created = futures::stream::iter(objects)
        .map(|object| create(client.clone(), object))
        .buffer_unordered(concurrency as usize)
        .try_fold(0u64, |n, ()| async move {
            if (n + 1) % 10_000 == 0 {
                eprintln!("  {} objects created", thousands((n + 1) as f64));
            }
            Ok(n + 1)
        })
        .await?;
    // And the bench slice.
    Ok(created + 1)
}

async fn wait_established(crds: &Api<CustomResourceDefinition>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let crd = crds.get(CRD_NAME).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the FailoverService CRD was not Established within 60 s: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates one object given as JSON with its `apiVersion` and `kind`, retrying twice
/// on errors other than a refusal (a busy API server may time a request out).
async fn create(client: kube::Client, object: Value) -> Result<()> {
    let resource = resource_of(&object)?;
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .context("object without a namespace")?
        .to_owned();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let object: DynamicObject = serde_json::from_value(object)?;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &resource);
    let mut attempt = 1;
    loop {
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                return Err(kube::Error::Api(status))
                    .with_context(|| format!("creating {} {namespace}/{name}", resource.kind));
            }
            Err(e) if attempt < 3 => {
                eprintln!(
                    "  creating {} {namespace}/{name}: {e}; retrying",
                    resource.kind
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "creating {} {namespace}/{name} ({attempt} attempts)",
                        resource.kind
                    )
                })
            }
        }
    }
}

/// The resource an object's `apiVersion` and `kind` name (only those this task writes).
fn resource_of(object: &Value) -> Result<ApiResource> {
    let (group, version, kind, plural) =
        match (object["apiVersion"].as_str(), object["kind"].as_str()) {
            (Some("v1"), Some("Service")) => ("", "v1", "Service", "services"),
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
                ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
            }
            (Some("failover.detour.io/v1alpha1"), Some("FailoverService")) => (
                "failover.detour.io",
                "v1alpha1",
                "FailoverService",
                "failoverservices",
            ),
            (api_version, kind) => {
                bail!("no resource for apiVersion {api_version:?} kind {kind:?}")
            }
        };
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

/// Waits for the agent's first Kubernetes "configuration reloaded" line (the maps
/// written after the first sync); returns the time since `started`.
fn wait_first_sync(agent: &Agent, log: &Path, started: Instant) -> Result<Duration> {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if !kubernetes_reloads(&text).is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > SYNC_BUDGET {
            bail!(
                "the agent did not sync within {SYNC_BUDGET:?}{}",
                agent.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What one `GET /metrics` returned.
struct Scrape {
    series: usize,
    bytes: usize,
    took: Duration,
}

/// One `GET /metrics` on the agent, read whole (bounded in time).
fn scrape_metrics(agent: &Agent) -> Result<Scrape> {
    use std::io::{Read, Write};
    let addr = agent.metrics_address()?;
    let start = Instant::now();
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: detour\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)
        .context("reading the agent's /metrics")?;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(Scrape {
        series: body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
        bytes: body.len(),
        took,
    })
}

/// How many distinct services `detour services` lists.
fn served_services(agent: &Agent) -> Result<usize> {
    let services = agent.services_json()?;
    let names: std::collections::HashSet<&str> = services
        .as_array()
        .context("`detour services -o json` is not a list")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    Ok(names.len())
}

/// Waits until `sink` accepted a connection after this call, bounded by `timeout`.
fn wait_until_accepts(sink: &AcceptSink, timeout: Duration) -> Result<()> {
    let before = sink.accepted();
    let deadline = Instant::now() + timeout;
    while sink.accepted() == before {
        if Instant::now() > deadline {
            bail!("no connection accepted within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A `/proc/PID/status` size field (`VmRSS`, `VmHWM`) in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_field_mib(&status, field).with_context(|| format!("{field} in /proc/{pid}/status"))
}

fn status_field_mib(status: &str, field: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds (user + system) the process used over `window`.
fn cpu_seconds(pid: u32, window: Duration) -> Result<f64> {
    let read = || -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        stat_cpu_ticks(&stat).with_context(|| format!("utime/stime in /proc/{pid}/stat"))
    };
    let before = read()?;
    thread::sleep(window);
    let after = read()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(after.saturating_sub(before) as f64 / hz as f64)
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks. The
/// command name may hold spaces and parentheses: fields are counted after its last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A numeric `name=value` field of a log line.
fn field(line: &str, name: &str) -> Option<f64> {
    let key = format!("{name}=");
    let at = line
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?
        .0
        + key.len();
    line[at..].split_whitespace().next()?.parse().ok()
}

/// One "configuration reloaded" line the Kubernetes source caused.
#[derive(Debug, PartialEq)]
struct Reload {
    /// When the agent's loop took the model: the line's timestamp less `total_ms`.
    began: Option<SystemTime>,
    total_ms: f64,
}

/// Every Kubernetes reload of the agent's log, in order.
fn kubernetes_reloads(log: &str) -> Vec<Reload> {
    log.lines()
        .filter(|l| l.contains("configuration reloaded") && l.contains("why=\"kubernetes\""))
        .filter_map(|l| {
            let total_ms = field(l, "total_ms")?;
            let logged = l
                .split_whitespace()
                .next()
                .and_then(|t| humantime::parse_rfc3339(t).ok());
            let began = logged.and_then(|t| t.checked_sub(Duration::from_secs_f64(total_ms / 1e3)));
            Some(Reload { began, total_ms })
        })
        .collect()
}

/// Per change, from its PATCH to the agent's loop taking the model, in ms; nothing
/// unless the log has exactly one reload per change (coalesced or extra reloads would
/// pair the wrong ones).
fn to_agent_ms(sent_at: &[SystemTime], reloads: &[Reload]) -> Vec<f64> {
    if sent_at.len() != reloads.len() {
        return Vec::new();
    }
    sent_at
        .iter()
        .zip(reloads)
        .filter_map(|(sent, reload)| {
            let began = reload.began?;
            Some(began.duration_since(*sent).ok()?.as_secs_f64() * 1e3)
        })
        .collect()
}

/// The watches' own `sync_ms` on the agent's first sync.
fn first_sync_ms(log: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains("kubernetes: first sync;"))
        .and_then(|l| field(l, "sync_ms"))
}

fn percentile(values: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (ms.len() as f64)).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

fn report(m: &Measured, changes: u32) -> String {
    let mut out = String::new();
    let endpoints_total = (m.services - 1) * m.endpoints + 1;
    let _ = writeln!(
        out,
        "\nthe Kubernetes source: {} FailoverServices, {} endpoints over 3 clusters, {} objects; \
         {changes} EndpointSlice changes (server-side apply); latency = PATCH sent → first \
         connect to the new backend; \
         the split columns are medians: PATCH answered = the API server's reply, to the \
         agent's loop = PATCH sent → the agent starts applying the new model (watch event \
         and model build included), agent reload = its apply (`total_ms`)\n",
        thousands(f64::from(m.services)),
        thousands(f64::from(endpoints_total)),
        thousands(m.objects as f64),
    );
    let _ = writeln!(
        out,
        "| services × endpoints | load | first sync | p50 | p99 | max | PATCH answered | to the agent's loop | agent reload | RSS settled | RSS after changes | RSS peak | CPU at rest | client |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let med = |v: &[f64]| {
        if v.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.0} ms", median(v.to_vec()))
        }
    };
    let acked: Vec<f64> = m.acked.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let agent_sync = m
        .agent_sync_ms
        .map_or_else(String::new, |ms| format!(" (lists {ms:.0} ms)"));
    let p99 = percentile(&m.latencies, 99.0);
    let _ = writeln!(
        out,
        "| {} × {} | {:.1} s | {:.1} s{agent_sync} | {:.1} ms | {p99:.1} ms | {:.1} ms | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} % over {:?} | {} |",
        thousands(f64::from(m.services)),
        m.endpoints,
        m.load.as_secs_f64(),
        m.first_sync.as_secs_f64(),
        percentile(&m.latencies, 50.0),
        percentile(&m.latencies, 100.0),
        med(&acked),
        med(&m.to_agent_ms),
        med(&m.agent_reload_ms),
        m.rss_settled_mib,
        m.rss_after_mib,
        m.rss_peak_mib,
        m.cpu_rest * 100.0,
        m.rest,
        m.client,
    );
    let trace: Vec<String> = [1, 10, 25, m.rss_trace.len()]
        .into_iter()
        .filter(|&n| n >= 1 && n <= m.rss_trace.len())
        .collect::<std::collections::BTreeSet<usize>>()
        .into_iter()
        .map(|n| format!("{:.0} MiB after change {n}", m.rss_trace[n - 1]))
        .collect();
    let _ = writeln!(out, "\n{}", m.scrape);
    let _ = writeln!(out, "agent RSS: {}", trace.join(", "));
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let rss = m.rss_settled_mib.max(m.rss_after_mib);
    let _ = writeln!(
        out,
        "\ntargets: p99 under 50 ms: {} ({p99:.1} ms); RSS under 64 MiB: {} ({rss:.1} MiB)",
        verdict(p99 < 50.0),
        verdict(rss < 64.0),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_parse_and_refuse_nonsense() {
        assert_eq!(parse_setup("10000x10").unwrap(), (10_000, 10));
        assert_eq!(parse_setup("100x10").unwrap(), (100, 10));
        for bad in ["10000", "x10", "0x1", "10x0", "10x31", "ax1", "60000x10"] {
            assert!(parse_setup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_object_names_a_resource() {
        for object in bench_objects().iter().chain(&filler_objects(1, 3)) {
            resource_of(object).unwrap();
        }
        assert!(resource_of(&json!({"apiVersion": "v1", "kind": "Pod"})).is_err());
    }

    #[test]
    fn the_crd_parses() {
        let crd: CustomResourceDefinition = serde_saphyr::from_str(CRD).unwrap();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
    }

    #[test]
    fn proc_fields_parse() {
        let status = "Name:\tdetour\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n";
        assert_eq!(status_field_mib(status, "VmRSS"), Some(10.0));
        assert_eq!(status_field_mib(status, "VmHWM"), Some(20.0));
        assert_eq!(status_field_mib(status, "VmSwap"), None);
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ticks(stat), Some(12));
        assert!(stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()).is_some());
    }

    #[test]
    fn timings_come_from_the_kubernetes_lines() {
        let log = "\
x INFO kubernetes: first sync; the maps now follow the cluster sync_ms=1234
x INFO configuration reloaded why=\"kubernetes\" services=3 read_parse_ms=0 total_ms=16
x INFO configuration reloaded why=\"file changed\" services=3 total_ms=99
x INFO configuration reloaded why=\"kubernetes\" services=3 apply_total_ms=7 total_ms=5";
        let totals: Vec<f64> = kubernetes_reloads(log).iter().map(|r| r.total_ms).collect();
        assert_eq!(totals, vec![16.0, 5.0]);
        assert_eq!(first_sync_ms(log), Some(1234.0));
        let stamped = "2026-11-30T08:29:50.505460Z  INFO detour::runtime: configuration reloaded \
                       why=\"kubernetes\" services=100 apply_ms=6 total_ms=6";
        let reloads = kubernetes_reloads(stamped);
        let began = humantime::parse_rfc3339("2026-11-30T08:29:50.499460Z").unwrap();
        assert_eq!(
            reloads,
            vec![Reload {
                began: Some(began),
                total_ms: 6.0
            }]
        );
        let sent = humantime::parse_rfc3339("2026-11-30T08:29:50.400Z").unwrap();
        let ms = to_agent_ms(&[sent], &reloads);
        assert_eq!(ms.len(), 1);
        assert!((ms[0] - 99.46).abs() < 1e-6, "{ms:?}");
        assert!(to_agent_ms(&[sent, sent], &reloads).is_empty());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<Duration> = (1..=50).map(Duration::from_millis).collect();
        assert!((percentile(&v, 50.0) - 25.0).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 50.0).abs() < 1e-9);
    }
}

//! The fault suite: every stage a process of its own against real servers, under load from an
//! HTTP and a NATS-native producer, while faults happen one after the other: kill -9 of each
//! stage (then a restart), PostgreSQL stopped for a while, nats-server killed and restarted,
//! and on a three-node cluster with every stream on three replicas, the loss of the node that
//! leads EVENTS. After each fault the pipeline must catch up with nothing lost, nothing stored
//! twice, gapless streams, exact statistics, every delivery made and every projection current
//! ([`checks`]).
//!
//! `scripts/chaos` runs the same as a longer soak: `EVENT_CHAOS_LOAD_SECS` (seconds of load
//! before and after each fault, default 2) and `EVENT_CHAOS_ROUNDS` (default 1). The figures
//! are printed as a table, and written to `EVENT_CHAOS_SUMMARY` when it is set.

mod checks;
mod load;
mod topology;

use std::time::Duration;

use checks::Figures;
use load::Load;
use topology::{Nats, Topology};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Seconds of load around each fault.
fn load_secs() -> Duration {
    Duration::from_secs(setting("EVENT_CHAOS_LOAD_SECS", 2))
}

#[derive(Clone, Copy)]
enum Fault {
    Kill(&'static str),
    StopPostgres,
    RestartNats,
    LoseEventsLeader,
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Fault::Kill(stage) => format!("kill -9 {stage}"),
            Fault::StopPostgres => "PostgreSQL stopped 8 s".to_owned(),
            Fault::RestartNats => "nats-server killed, back after 3 s".to_owned(),
            Fault::LoseEventsLeader => "EVENTS leader node killed, back after 5 s".to_owned(),
        }
    }

    /// Makes it happen, and ends it.
    async fn happen(&self, topology: &mut Topology) {
        match *self {
            Fault::Kill(stage) => {
                topology.kill(stage);
                tokio::time::sleep(Duration::from_secs(2)).await;
                topology.launch(stage);
                topology.wait_ready(stage).await;
            }
            Fault::StopPostgres => {
                topology.postgres.stop();
                tokio::time::sleep(Duration::from_secs(8)).await;
                topology.postgres.launch().expect("PostgreSQL starts again");
            }
            Fault::RestartNats => {
                let Nats::Single(server) = &mut topology.nats else { unreachable!("a single server") };
                let port = server.port();
                server.kill();
                tokio::time::sleep(Duration::from_secs(3)).await;
                let dir = topology.dir.path().join("nats");
                *server = event_service::infra::local::LocalNats::start(&topology::nats_server_bin(), &dir, port)
                    .expect("nats-server starts again");
            }
            Fault::LoseEventsLeader => {
                let leader = events_leader(topology).await;
                let Nats::Cluster(cluster) = &mut topology.nats else { unreachable!("a cluster") };
                // The servers are named nats-1, nats-2, nats-3 in order.
                let index = leader.trim_start_matches("nats-").parse::<usize>().expect("a server name") - 1;
                eprintln!("EVENTS is led by {leader}: killing it");
                cluster.servers[index].kill();
                tokio::time::sleep(Duration::from_secs(5)).await;
                cluster.restart(index).expect("the node starts again");
            }
        }
    }
}

/// The name of the server leading the EVENTS stream.
async fn events_leader(topology: &Topology) -> String {
    let client = async_nats::connect(topology.nats.url().split(',').collect::<Vec<_>>()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EVENTS").await.expect("EVENTS");
    let info = stream.info().await.expect("stream info");
    info.cluster.as_ref().and_then(|cluster| cluster.leader.clone()).expect("EVENTS has a leader")
}

/// Each fault in turn under load; the figures of each.
async fn run(topology: &mut Topology, faults: &[Fault]) -> Vec<Figures> {
    let mut figures = Vec::new();
    for round in 0..setting("EVENT_CHAOS_ROUNDS", 1) {
        for (index, fault) in faults.iter().enumerate() {
            let tag = format!("r{round}f{index}");
            let load = Load::start(topology.gateways(), &topology.nats.url(), &tag).await;
            tokio::time::sleep(load_secs()).await;
            fault.happen(topology).await;
            tokio::time::sleep(load_secs()).await;
            let sent = load.stop().await;
            let one = checks::verify(topology, sent, &fault.name(), &tag).await;
            eprintln!("{one:?}");
            figures.push(one);
        }
    }
    figures
}

fn summarize(title: &str, figures: &[Figures]) {
    let summary = format!("## {title}\n\n{}", checks::table(figures));
    println!("{summary}");
    if let Ok(path) = std::env::var("EVENT_CHAOS_SUMMARY") {
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&summary);
        text.push('\n');
        std::fs::write(path, text).expect("write the summary");
    }
}

/// One topology at a time: each is a dozen processes on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_killed_postgres_stopped_and_nats_restarted_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let mut topology = Topology::start(false).await;
    let faults = [
        Fault::Kill("gateway-1"),
        Fault::Kill("persister"),
        Fault::Kill("processor"),
        Fault::Kill("dispatcher"),
        Fault::Kill("projector"),
        Fault::StopPostgres,
        Fault::RestartNats,
    ];
    let figures = run(&mut topology, &faults).await;
    summarize("One nats-server", &figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_that_leads_events_on_a_three_node_cluster_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut topology = Topology::start(true).await;
    let figures = run(&mut topology, &[Fault::LoseEventsLeader]).await;
    summarize("Three nats-servers, streams on three replicas", &figures);
}

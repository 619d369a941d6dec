//! The benchmark's client driver: `clients` connections run one variant's statement for
//! `seconds`, each call bound with its own random workspace id in binary, as an application's
//! client library (pgx, tokio-postgres, JDBC) sends `SELECT wsusage_mark($1)`. pgbench cannot
//! bind a uuid: its variables are numbers, so the id had to be computed by SQL in the statement,
//! a cost the `SELECT 1` floor does not pay and applications do not either.
//!
//! Like pgbench, a few threads (one per core by default) each drive their share of the
//! connections with poll(2); every connection has one call in flight. Prints one JSON object:
//! calls, marks, elapsed seconds, calls/s, marks/s and p50/p99 latency in milliseconds, timed
//! from the moment every connection is ready.
//!
//! With `--connect-per-call`, each client is a thread that opens a new connection for every call
//! and closes it after, as PHP without persistent connections, a serverless function or a cron
//! script does: every call is a new backend's first. It then also reports the first call's own
//! latency (Parse, then Bind/Execute, in the new backend) apart from the connection's.
//!
//! ```text
//! wsusage-bench-driver --socket DIR/.s.PGSQL.5432 --variant mark --clients 8 --seconds 15
//! wsusage-bench-driver --socket DIR/.s.PGSQL.5432 --variant mark --clients 8 --seconds 5 --connect-per-call
//! ```

mod protocol;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use protocol::{Connection, Progress};
use workload::{Random, Variant, Workload};

/// The command line.
#[derive(clap::Parser)]
#[command(name = "wsusage-bench-driver", about = "The benchmark's client: each variant's one statement, prepared once")]
struct Cli {
    /// The server's Unix socket file (DIR/.s.PGSQL.5432).
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, default_value = "postgres")]
    user: String,
    #[arg(long, default_value = "postgres")]
    database: String,
    #[arg(long, value_enum)]
    variant: Variant,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    /// Threads driving the connections (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Workspaces in the table: ids are drawn from 1..=rows.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    rows: u64,
    /// The hot subset `mark_hot` draws from: 1..=hot.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    hot: u64,
    /// Ids per `mark_many` call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    per_call: u64,
    /// Open a new connection for every call, and close it after.
    #[arg(long)]
    connect_per_call: bool,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("a positive number of seconds, not \"{text}\"")),
    }
}

struct Args {
    socket: PathBuf,
    user: String,
    database: String,
    workload: Workload,
    clients: usize,
    threads: usize,
    seconds: f64,
    connect_per_call: bool,
}

impl Args {
    fn from(cli: Cli) -> Result<Args, String> {
        if cli.hot > cli.rows || cli.per_call > cli.rows {
            return Err("need --hot <= --rows and --per-call <= --rows".into());
        }
        let count = |n: u64| usize::try_from(n).map_err(|_| format!("{n} is too large"));
        let threads = match cli.threads {
            Some(threads) => count(threads)?,
            None => std::thread::available_parallelism().map_or(2, usize::from),
        };
        Ok(Args {
            socket: cli.socket,
            user: cli.user,
            database: cli.database,
            workload: Workload { variant: cli.variant, rows: cli.rows, hot: cli.hot, per_call: cli.per_call },
            clients: count(cli.clients)?,
            threads,
            seconds: cli.seconds,
            connect_per_call: cli.connect_per_call,
        })
    }
}

/// What the driver prints: one JSON object. A latency is `null` when no call completed.
#[derive(serde::Serialize)]
struct Report {
    calls: u64,
    marks: u64,
    seconds: f64,
    calls_per_s: f64,
    marks_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// With a connection per call: the statement's own part of each call.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_call_p50_ms: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_call_p99_ms: Option<Option<f64>>,
}

/// What one thread measured.
struct Tally {
    calls: u64,
    started: Instant,
    finished: Instant,
    latencies_ns: Vec<u64>,
    /// With a connection per call: the statement's own part of each call (Parse, Bind/Execute).
    first_call_ns: Vec<u64>,
}

fn main() -> ExitCode {
    let args = match Args::from(<Cli as clap::Parser>::parse()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("wsusage-bench-driver: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wsusage-bench-driver: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.connect_per_call {
        return run_connecting(args);
    }
    let threads = args.threads.clamp(1, args.clients);
    let ready = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            // Spread the connections as evenly as pgbench does.
            let share = args.clients / threads + usize::from(t < args.clients % threads);
            let (socket, user, database) = (args.socket.clone(), args.user.clone(), args.database.clone());
            let (workload, seconds, ready) = (args.workload, args.seconds, Arc::clone(&ready));
            std::thread::spawn(move || {
                let connected = connect_all(&socket, &user, &database, &workload, share);
                // Every thread reaches the barrier, connected or not, so none waits forever.
                ready.wait();
                drive(connected?, &workload, seconds, t as u64)
            })
        })
        .collect();
    report_when_done(args, handles)
}

/// Wait for every client thread, then print what they measured.
fn report_when_done(args: &Args, handles: Vec<std::thread::JoinHandle<Result<Tally, String>>>) -> Result<(), String> {
    let mut tallies = Vec::new();
    for handle in handles {
        tallies.push(handle.join().map_err(|_| "a client thread panicked".to_string())??);
    }
    report(args, tallies);
    Ok(())
}

fn connect_all(
    socket: &std::path::Path,
    user: &str,
    database: &str,
    workload: &Workload,
    count: usize,
) -> Result<Vec<Connection>, String> {
    let (sql, types) = workload.statement();
    (0..count)
        .map(|_| {
            let mut conn = Connection::connect(socket, user, database)
                .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
            conn.prepare(sql, types).map_err(|e| format!("cannot prepare \"{sql}\": {e}"))?;
            Ok(conn)
        })
        .collect()
}

/// Keep one call in flight on each connection until `seconds` have passed, then let the calls
/// in flight finish (they count) and stop.
fn drive(mut conns: Vec<Connection>, workload: &Workload, seconds: f64, seed: u64) -> Result<Tally, String> {
    let mut random = Random::new(seed + 1);
    let mut param = Vec::new();
    let mut fds: Vec<libc::pollfd> =
        conns.iter().map(|c| libc::pollfd { fd: c.raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut sent_at = Vec::with_capacity(conns.len());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    for conn in &mut conns {
        workload.next_param(&mut random, &mut param);
        conn.send_call(&params_of(&param)).map_err(|e| format!("cannot send: {e}"))?;
        sent_at.push(Instant::now());
    }
    let mut tally = Tally {
        calls: 0,
        started,
        finished: started,
        latencies_ns: Vec::with_capacity(1 << 20),
        first_call_ns: Vec::new(),
    };
    let mut in_flight = conns.len();
    while in_flight > 0 {
        let nfds = libc::nfds_t::try_from(fds.len()).map_err(|_| "too many connections".to_string())?;
        // SAFETY: `fds` is a live, correctly sized array of pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, 1000) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {error}"));
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            if fds[i].fd < 0 || fds[i].revents == 0 {
                continue;
            }
            match conn.read_some().map_err(|e| format!("call failed: {e}"))? {
                Progress::Pending => continue,
                Progress::Ready => {}
            }
            let now = Instant::now();
            tally.calls += 1;
            tally.latencies_ns.push(u64::try_from((now - sent_at[i]).as_nanos()).unwrap_or(u64::MAX));
            tally.finished = now;
            if now < deadline {
                workload.next_param(&mut random, &mut param);
                conn.send_call(&params_of(&param)).map_err(|e| format!("cannot send: {e}"))?;
                sent_at[i] = Instant::now();
            } else {
                fds[i].fd = -1; // poll ignores it from now on
                in_flight -= 1;
            }
        }
    }
    Ok(tally)
}

/// A thread per client, each connecting anew for every call until `seconds` have passed.
fn run_connecting(args: &Args) -> Result<(), String> {
    let ready = Arc::new(Barrier::new(args.clients));
    let handles: Vec<_> = (0..args.clients)
        .map(|t| {
            let (socket, user, database) = (args.socket.clone(), args.user.clone(), args.database.clone());
            let (workload, seconds, ready) = (args.workload, args.seconds, Arc::clone(&ready));
            std::thread::spawn(move || {
                ready.wait();
                connect_per_call(&socket, &user, &database, &workload, seconds, t as u64)
            })
        })
        .collect();
    report_when_done(args, handles)
}

fn connect_per_call(
    socket: &std::path::Path,
    user: &str,
    database: &str,
    workload: &Workload,
    seconds: f64,
    seed: u64,
) -> Result<Tally, String> {
    let (sql, types) = workload.statement();
    let mut random = Random::new(seed + 1);
    let mut param = Vec::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tally = Tally { calls: 0, started, finished: started, latencies_ns: Vec::new(), first_call_ns: Vec::new() };
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    while Instant::now() < deadline {
        workload.next_param(&mut random, &mut param);
        let began = Instant::now();
        let mut conn = Connection::connect(socket, user, database)
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        let connected = Instant::now();
        conn.prepare(sql, types).map_err(|e| format!("cannot prepare \"{sql}\": {e}"))?;
        conn.call(&params_of(&param)).map_err(|e| format!("call failed: {e}"))?;
        let done = Instant::now();
        conn.close().map_err(|e| format!("cannot close: {e}"))?;
        tally.calls += 1;
        tally.latencies_ns.push(nanos(done - began));
        tally.first_call_ns.push(nanos(done - connected));
        tally.finished = done;
    }
    Ok(tally)
}

fn params_of(param: &[u8]) -> Vec<&[u8]> {
    if param.is_empty() {
        Vec::new()
    } else {
        vec![param]
    }
}

fn report(args: &Args, tallies: Vec<Tally>) {
    let calls: u64 = tallies.iter().map(|t| t.calls).sum();
    let started = tallies.iter().map(|t| t.started).min();
    let finished = tallies.iter().map(|t| t.finished).max();
    let elapsed = match (started, finished) {
        (Some(s), Some(f)) => (f - s).as_secs_f64().max(1e-9),
        _ => args.seconds,
    };
    let mut first_calls: Vec<u64> = tallies.iter().flat_map(|t| t.first_call_ns.iter().copied()).collect();
    let mut latencies: Vec<u64> = tallies.into_iter().flat_map(|t| t.latencies_ns).collect();
    latencies.sort_unstable();
    first_calls.sort_unstable();
    let percentile = |sorted: &[u64], p: f64| -> Option<f64> {
        let at = ((p * sorted.len() as f64) as usize).min(sorted.len().checked_sub(1)?);
        Some(sorted[at] as f64 / 1e6)
    };
    let marks = calls * args.workload.marks_per_call();
    let connecting = args.connect_per_call;
    let report = Report {
        calls,
        marks,
        seconds: elapsed,
        calls_per_s: calls as f64 / elapsed,
        marks_per_s: marks as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        first_call_p50_ms: connecting.then(|| percentile(&first_calls, 0.50)),
        first_call_p99_ms: connecting.then(|| percentile(&first_calls, 0.99)),
    };
    match serde_json::to_string(&report) {
        Ok(json) => println!("{json}"),
        Err(error) => eprintln!("wsusage-bench-driver: could not write the report: {error}"),
    }
}

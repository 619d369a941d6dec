//! Monitoring with Prometheus: the real prometheus-postgres-exporter (Debian's), given
//! monitoring/postgres_exporter.yaml, serves wsusage's counters as metrics with their values, and
//! the alert rules of monitoring/alerts.yml name only metrics it serves.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use wsusage_tests::*;

fn monitoring_file(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring").join(name)
}

/// The exporter on a free loopback port, connected to the cluster's `postgres` database.
struct Exporter {
    port: u16,
    child: Child,
}

impl Exporter {
    fn start(cluster: &Cluster) -> Exporter {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("prometheus-postgres-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--extend.query-path={}", monitoring_file("postgres_exporter.yaml").display()))
            .arg("--disable-settings-metrics")
            .env("DATA_SOURCE_NAME", format!("{} sslmode=disable", cluster.conninfo("postgres")))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start prometheus-postgres-exporter (Debian: apt-get install prometheus-postgres-exporter)");
        Exporter { port, child }
    }

    fn try_scrape(&self) -> std::io::Result<String> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&address, PATIENCE)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        stream.set_write_timeout(Some(PATIENCE))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    /// The value of the sample `name{label="value",…}` once served: a sample of that name with
    /// at least those labels (the exporter adds its own, `server`). The exporter learns the
    /// server's version at its first scrape, and runs the extra queries from the next.
    fn value(&self, sample: &str) -> f64 {
        let (name, labels) = sample.split_once('{').unwrap_or((sample, "}"));
        let wanted: Vec<&str> = labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
        let mut found = None;
        wait_until(&format!("the exporter to serve {sample}"), || {
            found = self.try_scrape().ok().and_then(|metrics| {
                metrics.lines().find_map(|line| {
                    let (series, value) = line.rsplit_once(' ')?;
                    let (line_name, line_labels) = series.split_once('{').unwrap_or((series, ""));
                    let labels: Vec<&str> = line_labels.trim_end_matches('}').split(',').collect();
                    (line_name == name && wanted.iter().all(|w| labels.contains(w))).then(|| value.parse().ok())?
                })
            });
            found.is_some()
        });
        found.unwrap()
    }

    fn metric_names(&self) -> Vec<String> {
        let metrics = self.try_scrape().expect("scrape");
        metrics
            .lines()
            .filter(|line| !line.starts_with('#') && line.starts_with("wsusage"))
            .filter_map(|line| line.split(['{', ' ']).next().map(str::to_owned))
            .collect()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_exporter_serves_wsusages_counters_with_their_values() {
    let cluster = Cluster::start(&[("wsusage.max_pending", "1000"), ("wsusage.flush_interval", "'1h'")]);
    let (mut client, ids) = cluster.with_workspaces(40);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[..30].to_vec()]).unwrap();
    let since_flush = std::time::Instant::now();
    assert_eq!(flush(&mut client), 30);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids[30..].to_vec()]).unwrap();

    let exporter = Exporter::start(&cluster);
    assert_eq!(exporter.value("wsusage_marks"), 40.0);
    assert_eq!(exporter.value("wsusage_pending"), 10.0);
    assert_eq!(exporter.value("wsusage_capacity"), 1000.0);
    assert_eq!(exporter.value("wsusage_ids_flushed"), 30.0);
    assert_eq!(exporter.value("wsusage_launcher_up"), 1.0);
    assert_eq!(exporter.value("wsusage_flush_interval_seconds"), 3600.0);
    // The flush above is the only one (the interval is an hour): no longer ago than it was asked.
    let since = exporter.value("wsusage_seconds_since_last_flush");
    assert!((0.0..=since_flush.elapsed().as_secs_f64() + 1.0).contains(&since), "{since} s since the flush");
    assert_eq!(exporter.value("wsusage_database_pending{datname=\"postgres\"}"), 10.0);
    assert_eq!(exporter.value("wsusage_target_ids_flushed{datname=\"postgres\",target=\"default\"}"), 30.0);

    // A failing flush shows as it happens.
    client.batch_execute("ALTER TABLE workspaces RENAME TO parked").unwrap();
    client.execute("SELECT wsusage_flush()", &[]).unwrap_err();
    wait_until("the failure to be served", || {
        exporter.value("wsusage_database_consecutive_failures{datname=\"postgres\"}") == 1.0
    });
    assert_eq!(exporter.value("wsusage_failures"), 1.0, "the one failed round");
}

/// Every `wsusage_…` metric an alert rule names is one the exporter serves (a rule on a misspelt
/// metric would never fire).
#[test]
fn the_alert_rules_name_only_metrics_the_exporter_serves() {
    let cluster = Cluster::start(&[]);
    let (mut client, ids) = cluster.with_workspaces(1);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    flush(&mut client);
    let exporter = Exporter::start(&cluster);
    exporter.value("wsusage_database_pending{datname=\"postgres\"}");
    let served = exporter.metric_names();
    let mut named = 0;
    let rules = alert_rules();
    let expressions = rules.iter().map(|rule| rule.expr.as_str());
    for word in expressions.flat_map(|expr| expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))) {
        if word.starts_with("wsusage_") {
            named += 1;
            assert!(served.iter().any(|name| name == word), "alerts.yml names {word}, not served: {served:?}");
        }
    }
    assert!(named >= 5, "the rules name the metrics they watch");
    // Every alert of the file is one the_alerts_fire_when_they_should_and_only_then runs.
    let mut alerts: Vec<&str> = rules.iter().map(|rule| rule.alert.as_str()).collect();
    alerts.sort_unstable();
    let mut tested = ALERTS.to_vec();
    tested.sort_unstable();
    assert_eq!(alerts, tested);
}

/// What one scrape of the exporter says of `wsusage`: every `wsusage_…` sample, as (series,
/// value), the series as Prometheus names it (`name{labels}`).
fn wsusage_samples(exporter: &Exporter) -> Vec<(String, f64)> {
    let metrics = exporter.try_scrape().expect("scrape");
    metrics
        .lines()
        .filter(|line| line.starts_with("wsusage_"))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// How the scraped values go on over the test's 15 minutes: each held at its value, but for the
/// time without a flush, which grows by a minute a minute unless flushes succeed, and the count of
/// refused keys, which grows by its value a minute while marks keep being refused.
#[derive(Clone, Copy)]
struct Course {
    flushing: bool,
    refusing: bool,
}

const ALERTS: [&str; 5] =
    ["WsusageLauncherDown", "WsusageFlushFailing", "WsusagePendingHigh", "WsusageRejecting", "WsusageNoFlush"];

/// The labels of series `name` (the first whose value passes `pick`), as a YAML map's entries,
/// and its value.
fn labels_and_value(samples: &[(String, f64)], name: &str, pick: impl Fn(f64) -> bool) -> (String, f64) {
    let (series, value) = samples
        .iter()
        .find(|(series, value)| series.starts_with(&format!("{name}{{")) && pick(*value))
        .unwrap_or_else(|| panic!("no {name} sample: {samples:?}"));
    let labels = series.split_once('{').unwrap().1.trim_end_matches('}');
    let entries = labels.split(',').filter_map(|label| label.split_once('=')).map(|(k, v)| format!("{k}: {v}, "));
    (entries.collect(), *value)
}

/// The alert rules of alerts.yml, as Prometheus reads the file.
#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    rules: Vec<AlertRule>,
}

#[derive(serde::Deserialize)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

fn alert_rules() -> Vec<AlertRule> {
    let text = std::fs::read_to_string(monitoring_file("alerts.yml")).unwrap();
    let file: RuleFile = serde_yaml_ng::from_str(&text).expect("alerts.yml is a Prometheus rule file");
    file.groups.into_iter().flat_map(|group| group.rules).collect()
}

/// The `summary` and `description` of alert `name` in alerts.yml, their templates filled as
/// Prometheus fills them for an alert of database `datname` and value `value`.
fn annotations_of(name: &str, datname: &str, value: f64) -> (String, String) {
    let rule = alert_rules().into_iter().find(|rule| rule.alert == name).expect("the alert");
    let field = |key: &str| {
        rule.annotations
            .get(key)
            .expect("the annotation")
            .replace("{{ $labels.datname }}", datname)
            .replace("{{ $value }}", &value.to_string())
    };
    (field("summary"), field("description"))
}

/// What the alerts of alerts.yml do over 15 minutes of the series of `samples` going on as
/// `course` says, as `promtool test rules` evaluates them: `firing` fire at minute 10, the others
/// stay quiet. Panics with promtool's report otherwise.
fn assert_alerts(case: &str, samples: &[(String, f64)], course: Course, firing: &[&str]) {
    let mut test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
        monitoring_file("alerts.yml").display()
    );
    for (series, value) in samples {
        let values = if !course.flushing && series.starts_with("wsusage_seconds_without_flush{") {
            format!("{value}+60x15")
        } else if course.refusing && series.starts_with("wsusage_rejected{") {
            format!("{value}+{value}x15")
        } else {
            format!("{value}x15")
        };
        test.push_str(&format!("      - series: '{series}'\n        values: '{values}'\n"));
    }
    test.push_str("    alert_rule_test:\n");
    for alert in ALERTS {
        test.push_str(&format!("      - eval_time: 10m\n        alertname: {alert}\n        exp_alerts:"));
        if !firing.contains(&alert) {
            test.push_str(" []\n");
            continue;
        }
        // The failing database's series for its alert; the cluster-wide family's for the others.
        let (labels, value, datname) = if alert == "WsusageFlushFailing" {
            let (labels, value) = labels_and_value(samples, "wsusage_database_consecutive_failures", |v| v >= 3.0);
            (labels, value, "postgres")
        } else {
            let (labels, value) = labels_and_value(samples, "wsusage_pending", |_| true);
            (labels, value, "")
        };
        let (summary, description) = annotations_of(alert, datname, value);
        test.push_str(&format!(
            "\n          - exp_labels: {{{labels}}}\n            exp_annotations: {{summary: \"{summary}\", description: \"{description}\"}}\n"
        ));
    }
    let path =
        std::env::temp_dir().join(format!("wsusage-alerts-{}-{}.yml", std::process::id(), case.replace(' ', "-")));
    std::fs::write(&path, &test).unwrap();
    let out = output_within(Command::new("promtool").arg("test").arg("rules").arg(&path), "promtool", PATIENCE);
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{case}: promtool test rules failed:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const FLUSHING: Course = Course { flushing: true, refusing: false };
const STALLED: Course = Course { flushing: false, refusing: false };

// Every alert of alerts.yml, on series scraped from the real exporter of real clusters: each
// fires when it should (no launcher on a primary; keys pending and no flush for three intervals,
// none ever included; a database's rounds failing; the set over half full; marks refused) and
// stays quiet on a hot standby, a fresh server and a server whose flushes succeed. One test per
// case, so that their clusters run at once.

const MINUTE: (&str, &str) = ("wsusage.flush_interval", "'1min'");

/// Healthy: marks flushed, flushes going on; and a hot standby of it, with no launcher there by
/// design.
#[test]
fn no_alert_fires_on_a_healthy_primary_nor_on_its_hot_standby() {
    let primary = Cluster::start(&[MINUTE]);
    let (mut client, ids) = primary.with_workspaces(2);
    client.execute("SELECT wsusage_mark_many($1)", &[&ids]).unwrap();
    flush(&mut client);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let exporter = Exporter::start(&primary);
    exporter.value("wsusage_in_recovery");
    assert_alerts("healthy", &wsusage_samples(&exporter), FLUSHING, &[]);
    drop(exporter);

    let standby = Cluster::standby_of(&primary);
    let exporter = Exporter::start(&standby);
    assert_eq!(exporter.value("wsusage_in_recovery"), 1.0);
    assert_eq!(exporter.value("wsusage_launcher_up"), 0.0);
    assert_alerts("standby", &wsusage_samples(&exporter), STALLED, &[]);
}

/// A fresh server: nothing marked, so no flush yet is no fault.
#[test]
fn no_alert_fires_on_a_fresh_server_that_has_flushed_nothing_yet() {
    let fresh = Cluster::start(&[MINUTE]);
    let (_client, _) = fresh.with_workspaces(1);
    let exporter = Exporter::start(&fresh);
    assert_eq!(exporter.value("wsusage_seconds_since_last_flush"), -1.0);
    assert_alerts("fresh", &wsusage_samples(&exporter), STALLED, &[]);
}

/// No slot for a worker (the logical replication launcher and ours take both): keys pending, no
/// flush ever.
#[test]
fn wsusage_no_flush_fires_when_keys_wait_and_no_flush_ever_succeeded() {
    let no_worker = Cluster::start(&[MINUTE, ("max_worker_processes", "2")]);
    let (mut client, ids) = no_worker.with_workspaces_and_no_worker(1);
    no_worker.wait_for_launcher(&mut client);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    let exporter = Exporter::start(&no_worker);
    assert_eq!(exporter.value("wsusage_launcher_up"), 1.0);
    assert_eq!(exporter.value("wsusage_seconds_since_last_flush"), -1.0);
    assert_alerts("no worker slot", &wsusage_samples(&exporter), STALLED, &["WsusageNoFlush"]);
}

#[test]
fn wsusage_launcher_down_fires_on_a_primary_without_a_launcher() {
    let no_launcher = Cluster::start(&[MINUTE, ("max_worker_processes", "0")]);
    let (_client, _) = no_launcher.with_workspaces_and_no_worker(1);
    let exporter = Exporter::start(&no_launcher);
    assert_eq!(exporter.value("wsusage_launcher_up"), 0.0);
    assert_alerts("no launcher", &wsusage_samples(&exporter), STALLED, &["WsusageLauncherDown"]);
}

/// A database whose rounds keep failing (its table renamed away).
#[test]
fn wsusage_flush_failing_fires_when_a_databases_rounds_keep_failing() {
    let failing = Cluster::start(&[]);
    let (mut client, ids) = failing.with_workspaces(1);
    client.execute("SELECT wsusage_mark($1)", &[&ids[0]]).unwrap();
    client.batch_execute("ALTER TABLE workspaces RENAME TO gone").unwrap();
    for _ in 0..3 {
        assert_eq!(flush_error(&mut client).0, "42P01");
    }
    let exporter = Exporter::start(&failing);
    assert_eq!(exporter.value("wsusage_database_consecutive_failures{datname=\"postgres\"}"), 3.0);
    assert_alerts("failing", &wsusage_samples(&exporter), FLUSHING, &["WsusageFlushFailing"]);
}

/// The set over half full, and marks refused once full (and still refused). No worker may start
/// (as above), or the full set would be flushed early; with an hour's interval, three intervals
/// without a flush are not reached.
#[test]
fn wsusage_pending_high_and_wsusage_rejecting_fire_when_the_set_fills() {
    let full = Cluster::start(&[("wsusage.max_pending", "16"), ("max_worker_processes", "2")]);
    let (mut client, ids) = full.with_workspaces_and_no_worker(20);
    full.wait_for_launcher(&mut client);
    let error = client.execute("SELECT wsusage_mark_many($1)", &[&ids]).expect_err("the set is full");
    assert_eq!(sqlstate(&error), "53400");
    let exporter = Exporter::start(&full);
    assert_eq!(exporter.value("wsusage_pending"), 16.0);
    assert!(exporter.value("wsusage_rejected") > 0.0);
    let refusing = Course { flushing: false, refusing: true };
    assert_alerts("full", &wsusage_samples(&exporter), refusing, &["WsusagePendingHigh", "WsusageRejecting"]);
}

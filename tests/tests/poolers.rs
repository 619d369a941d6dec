//! Behind PgBouncer in transaction mode, as many deployments run: clients share a few server
//! connections, each statement on whichever is free. A mark is one statement and keeps no
//! session state, so nothing is lost or counted twice however the pooler deals them out.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;

use postgres::types::Type;
use wsusage_tests::*;

/// Debian's PgBouncer (1.18) in transaction mode, on a Unix socket in the cluster's directory,
/// with `server_connections` connections to the cluster's `postgres` database at most.
struct PgBouncer {
    dir: PathBuf,
    child: Child,
}

const PGBOUNCER_PORT: u16 = 6432;

impl PgBouncer {
    fn start(cluster: &Cluster, server_connections: usize) -> PgBouncer {
        let dir = cluster.owned_subdir("pgbouncer");
        let config = format!(
            "[databases]
postgres = host={cluster_dir} port=5432 dbname=postgres
[pgbouncer]
listen_addr =
listen_port = {PGBOUNCER_PORT}
unix_socket_dir = {dir}
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
default_pool_size = {server_connections}
max_client_conn = 200
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
",
            cluster_dir = cluster.dir.display(),
            dir = dir.display()
        );
        write_as_owner(&dir.join("pgbouncer.ini"), &config);
        write_as_owner(&dir.join("userlist.txt"), "\"postgres\" \"\"\n");
        let child = as_owner("/usr/sbin/pgbouncer")
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (Debian: apt-get install pgbouncer)");
        let bouncer = PgBouncer { dir, child };
        wait_until("pgbouncer to accept connections", || {
            bouncer.try_connect().is_ok() && bouncer.dir.join("pgbouncer.pid").exists()
        });
        bouncer
    }

    fn conninfo(&self) -> String {
        format!("host={} port={PGBOUNCER_PORT} user=postgres dbname=postgres", self.dir.display())
    }

    fn try_connect(&self) -> Result<Client, PgError> {
        Client::connect(&self.conninfo(), NoTls)
    }

    fn connect(&self) -> Client {
        self.try_connect().expect("connect through pgbouncer")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // The child is `runuser`, which waits for PgBouncer: stop PgBouncer itself, by its pid,
        // or by its configuration file's path should it have written no pid file.
        match std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            Ok(pid) => {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
            Err(_) => {
                let config = self.dir.join("pgbouncer.ini");
                let _ = std::process::Command::new("pkill").arg("-f").arg(config).status();
            }
        }
        if wait_within(&mut self.child, PATIENCE).is_none() {
            eprintln!("pgbouncer did not stop within {PATIENCE:?}: killed");
        }
    }
}

/// `wsusage_flush()` as an unnamed statement (see the test below).
fn flush_unnamed(client: &mut Client) -> i64 {
    client.query_typed("SELECT wsusage_flush()", &[]).unwrap()[0].get(0)
}

fn write_as_owner(path: &Path, text: &str) {
    let mut tee = as_owner("tee").arg(path).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().expect("tee");
    std::io::Write::write_all(tee.stdin.as_mut().expect("stdin"), text.as_bytes()).expect("write");
    drop(tee.stdin.take());
    assert!(tee.wait().expect("tee").success(), "write {}", path.display());
}

#[test]
fn many_clients_marking_through_two_server_connections_lose_and_double_count_nothing() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(400);
    let bouncer = PgBouncer::start(&cluster, 2);

    // 20 clients, each marking its own 20 ids one statement at a time with the extended
    // protocol: parameters bound in binary, the statement unnamed and parsed, bound and run in one
    // round trip — what PgBouncer before 1.21 passes through in transaction mode, where a named
    // statement prepared on one server connection may be executed on another. Through 2 server
    // connections.
    const CLIENTS: usize = 20;
    let per_client = ids.len() / CLIENTS;
    let gate = Gate::new(CLIENTS);
    // Which server connection ran each client's marks, as the server says (its backend's pid).
    let served_by: Vec<HashSet<i32>> = thread::scope(|scope| {
        let clients: Vec<_> = ids
            .chunks(per_client)
            .map(|part| {
                let (party, bouncer) = (gate.party(), &bouncer);
                scope.spawn(move || {
                    let mut client = bouncer.connect();
                    party.wait();
                    let mut servers = HashSet::new();
                    for id in part {
                        let row = client
                            .query_typed("SELECT wsusage_mark($1), pg_backend_pid()", &[(id, Type::UUID)])
                            .unwrap();
                        servers.insert(row[0].get::<_, i32>(1));
                    }
                    servers
                })
            })
            .collect();
        clients.into_iter().map(|client| client.join().unwrap()).collect()
    });
    // What the test is about: statements of different clients on one server connection.
    let servers: HashSet<i32> = served_by.iter().flatten().copied().collect();
    let shared = servers.iter().filter(|pid| served_by.iter().filter(|set| set.contains(pid)).count() > 1).count();
    assert!(shared > 0, "{CLIENTS} clients' marks ran on {} server connections, none shared", servers.len());

    let marks: i64 = admin.query_one("SELECT marks FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(marks, ids.len() as i64, "every mark counted once");
    // The flush, too, through the pooler.
    let mut client = bouncer.connect();
    assert_eq!(flush_unnamed(&mut client), ids.len() as i64);
    assert_eq!(count_used(&mut admin), ids.len() as i64);
    let pending: i64 = admin.query_one("SELECT pending FROM wsusage_stats", &[]).unwrap().get(0);
    assert_eq!(pending, 0, "nothing pending after the flush");
}

#[test]
fn a_batch_and_the_simple_protocol_pass_through_the_pooler() {
    let cluster = Cluster::start(&[]);
    let (mut admin, ids) = cluster.with_workspaces(50);
    let bouncer = PgBouncer::start(&cluster, 1);
    let mut client = bouncer.connect();
    client.execute_typed("SELECT wsusage_mark_many($1)", &[(&ids[..48].to_vec(), Type::UUID_ARRAY)]).unwrap();
    client.execute_typed("SELECT wsusage_mark($1)", &[(&ids[48], Type::UUID)]).unwrap();
    // And the simple protocol with an untyped literal, as drivers told to avoid prepared
    // statements behind a pooler send it: the server resolves it to uuid.
    client.batch_execute(&format!("SELECT wsusage_mark('{}')", ids[49])).unwrap();
    assert_eq!(flush_unnamed(&mut client), 50);
    assert_eq!(used_ids(&mut admin), sorted(&ids));
}

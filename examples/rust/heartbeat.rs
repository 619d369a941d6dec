//! A service-style heartbeat handler for wsusage: agents report that workspaces are in use, and
//! the service marks them through a connection pool.
//!
//! Run against a database with `CREATE EXTENSION wsusage`:
//!
//! ```sh
//! WSUSAGE_DSN='host=/tmp port=5432 user=app dbname=postgres' \
//! WORKSPACE_IDS='9b2f0c5e-…,0d41…' cargo run -p wsusage-tests --bin heartbeat-example
//! ```
//!
//! It shows three ways to mark: one prepared statement per heartbeat, the id sent as text (cast
//! to uuid by the statement), and many heartbeats batched into one `wsusage_mark_many` call. A
//! mark does not wait for the flush's UPDATE: it only records the id in shared memory.

use std::error::Error;
use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// One heartbeat: a prepared, pooled `SELECT wsusage_mark($1)`. The statement is prepared once
/// per connection (`prepare_cached`); the server infers `$1` as uuid, the one-argument
/// `wsusage_mark` being the only one.
async fn heartbeat(pool: &Pool, workspace: Uuid) -> Result<(), Box<dyn Error + Send + Sync>> {
    let client = pool.get().await?;
    let mark = client.prepare_cached("SELECT wsusage_mark($1)").await?;
    client.execute(&mark, &[&workspace]).await?;
    Ok(())
}

/// The same with the id sent as text, as drivers that pass every value as a string do; the
/// statement casts it.
async fn heartbeat_text(pool: &Pool, workspace: &str) -> Result<(), Box<dyn Error + Send + Sync>> {
    let client = pool.get().await?;
    client.execute("SELECT wsusage_mark($1::text::uuid)", &[&workspace]).await?;
    Ok(())
}

/// Many heartbeats collected over a tick, marked in one round trip.
async fn heartbeat_batch(pool: &Pool, workspaces: &[Uuid]) -> Result<(), Box<dyn Error + Send + Sync>> {
    let client = pool.get().await?;
    let mark_many = client.prepare_cached("SELECT wsusage_mark_many($1)").await?;
    client.execute(&mark_many, &[&workspaces]).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let dsn = std::env::var("WSUSAGE_DSN")?;
    let ids: Vec<Uuid> = std::env::var("WORKSPACE_IDS")?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Uuid::from_str)
        .collect::<Result<_, _>>()?;

    let config = tokio_postgres::Config::from_str(&dsn)?;
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager).max_size(4).build()?;

    // A third of the ids one by one, a third as text, the rest batched; concurrently, as agents
    // would report.
    let third = ids.len() / 3;
    let (single, rest) = ids.split_at(third);
    let (text, batched) = rest.split_at(third);
    let mut tasks = tokio::task::JoinSet::new();
    for &id in single {
        let pool = pool.clone();
        tasks.spawn(async move { heartbeat(&pool, id).await });
    }
    for id in text {
        let (pool, id) = (pool.clone(), id.to_string());
        tasks.spawn(async move { heartbeat_text(&pool, &id).await });
    }
    for chunk in batched.chunks(100) {
        let (pool, chunk) = (pool.clone(), chunk.to_vec());
        tasks.spawn(async move { heartbeat_batch(&pool, &chunk).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    println!("marked {} workspaces", ids.len());
    Ok(())
}

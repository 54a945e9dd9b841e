//! Postgres connection pool, database creation and migrations.

use std::{str::FromStr, time::Duration};

use sqlx::{
    ConnectOptions, Connection, PgPool,
    postgres::{PgConnectOptions, PgConnection, PgPoolOptions},
};

use crate::{CoreError, CoreResult};

/// The migrations embedded at compile time (see build.rs).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

fn options(url: &str) -> CoreResult<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map(|o| {
            // Nothing waits forever: a statement that runs longer than this is cancelled.
            // JIT off: every statement here is short, and the dashboard's window reads
            // cross the JIT's cost threshold only to spend more compiling than running
            // (a 7-day flaky query at 1,000,000 runs: 43 ms of JIT on 70 ms of work).
            o.options([("statement_timeout", "15s"), ("lock_timeout", "10s"), ("jit", "off")])
                .log_statements(tracing::log::LevelFilter::Trace)
        })
        .map_err(|e| CoreError::BadRequest(format!("invalid DATABASE_URL: {e}")))
}

/// A pool whose acquire times out quickly, so callers can answer 503 instead of hanging.
pub async fn connect(url: &str, max_connections: u32) -> CoreResult<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(warm_types(conn)))
        .connect_with(options(url)?)
        .await?;
    Ok(pool)
}

/// A pool that does not connect until first used (the API starts even if Postgres is down).
pub fn connect_lazy(url: &str, max_connections: u32) -> CoreResult<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Some(Duration::from_secs(300)))
        .after_connect(|conn, _| Box::pin(warm_types(conn)))
        .connect_lazy_with(options(url)?))
}

/// Brings the schema's custom types into a new connection's type cache, before the
/// pool hands the connection out: the catalog names them (every enum of the schema,
/// so a type a migration adds is warmed too), and one statement that returns a value
/// of each, and of each array, makes sqlx resolve them all in one lookup.
///
/// Why: sqlx looks a custom type up the first time a statement on a connection uses
/// it, in the middle of whatever transaction is running. Under load that catalog query
/// took 0.46 s on average and up to 2 s (`pg_stat_statements`, `switchboard bench`),
/// while the transaction held its row locks (claims of those runs waited behind it)
/// and its xid (every event committed meanwhile waited to reach the feed). A database
/// not yet migrated has no such types: nothing is warmed and types are looked up as
/// before. A failed warm-up only costs that, so it never fails the connection.
async fn warm_types(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let columns = sqlx::query_scalar!(
        r#"SELECT string_agg(format('NULL::%I.%I, NULL::%I.%I[]', n.nspname, t.typname, n.nspname, t.typname), ', ')
                  AS "columns"
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE t.typtype = 'e' AND n.nspname = current_schema()"#
    )
    .fetch_one(&mut *conn)
    .await;
    let warmed = match columns {
        Ok(Some(columns)) => {
            // Runtime SQL: type names from the catalog, quoted by format('%I').
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {columns}"))).fetch_optional(&mut *conn).await.map(|_| ())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = warmed {
        tracing::debug!(error = %e, "custom types not warmed on a new connection");
    }
    Ok(())
}

/// Creates the database named in `url` if it does not exist (connecting to `postgres`).
pub async fn create_database_if_missing(url: &str) -> CoreResult<()> {
    let opts = options(url)?;
    let name = opts.get_database().unwrap_or("postgres").to_string();
    if name == "postgres" {
        return Ok(());
    }
    let admin = opts.clone().database("postgres");
    let mut conn = PgConnection::connect_with(&admin).await?;
    let exists =
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS "exists!""#, name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        // Runtime SQL: an identifier cannot be a bind parameter.
        let sql = format!("CREATE DATABASE {quoted}");
        match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// Drops a database if it exists (the bench's own, when it is done), closing its
/// connections.
pub async fn drop_database(admin_url: &str, name: &str) -> CoreResult<()> {
    let mut conn = PgConnection::connect_with(&options(admin_url)?.database("postgres")).await?;
    // Runtime SQL: an identifier cannot be a bind parameter.
    let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", name.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
    conn.close().await.ok();
    Ok(())
}

/// One round trip to Postgres, for health checks.
pub async fn ping(pool: &PgPool) -> CoreResult<std::time::Duration> {
    let start = std::time::Instant::now();
    sqlx::query!("SELECT 1 AS one").fetch_one(pool).await?;
    Ok(start.elapsed())
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> CoreResult<()> {
    MIGRATOR.run(pool).await.map_err(|e| CoreError::Internal(format!("migration failed: {e}")))
}

/// A database operation run in a task of its own, so that a caller's timeout or
/// `select!` only stops *waiting* for it and never cancels it halfway.
///
/// Why: sqlx 0.9 leaves a pooled connection inside an open transaction when a
/// `begin()` is cancelled while it waits for the server's answer (its rollback guard
/// sees a transaction depth of 0 and queues nothing). The connection goes back to the
/// pool, and the next caller's autocommit statements run inside that transaction and
/// are never committed: a lost write that no error reports. Every caller that bounds a
/// database call in time (lease renewals, writing an outcome, the API's request
/// timeout) lets the call finish here instead.
pub struct Detached<T> {
    handle: tokio::task::JoinHandle<CoreResult<T>>,
}

impl<T: Send + 'static> Detached<T> {
    /// Starts `operation` in its own task.
    pub fn spawn(operation: impl std::future::Future<Output = CoreResult<T>> + Send + 'static) -> Detached<T> {
        Detached { handle: tokio::spawn(operation) }
    }

    /// Waits for the result at most `limit`; `None` when it is still running (wait
    /// again, or drop `self` to leave it running on its own).
    pub async fn wait(&mut self, limit: Duration) -> Option<CoreResult<T>> {
        match tokio::time::timeout(limit, &mut self.handle).await {
            Ok(Ok(result)) => Some(result),
            Ok(Err(e)) => Some(Err(CoreError::Internal(format!("a database task failed: {e}")))),
            Err(_) => None,
        }
    }

    /// Waits for the result until `deadline`; `None` when it is still running then.
    pub async fn wait_until(&mut self, deadline: tokio::time::Instant) -> Option<CoreResult<T>> {
        self.wait(deadline.saturating_duration_since(tokio::time::Instant::now())).await
    }
}

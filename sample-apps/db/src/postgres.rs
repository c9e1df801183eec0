//! The PostgreSQL backend: a deadpool pool of tokio-postgres connections, no TLS (in the mesh,
//! the sidecars carry the bytes; outside it, the server is on loopback).
//!
//! Connections are made on demand. A pooled connection whose server went away is noticed when
//! it is taken out (it reports itself closed) and replaced, so the app recovers on its own once
//! the server is back; the request that met the outage fails with [`DbError::Unavailable`].

use std::error::Error as _;
use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::{DatabaseUrl, DbError, Migration, Row, Statement, Value};

/// Connections per app.
const POOL_SIZE: usize = 8;
/// How long a query waits for a connection: a free one, or a new one to be made.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Key of the advisory lock migrations run under, so replicas starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7368_6f70; // "shop"

pub(crate) struct Postgres {
    url: String,
    pool: Pool,
}

impl Postgres {
    pub fn new(url: &DatabaseUrl, config: &tokio_postgres::Config) -> Result<Self, DbError> {
        let mut config = config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| DbError::Query {
                url: url.to_string(),
                reason: format!("building the connection pool: {e}"),
            })?;
        Ok(Self {
            url: url.to_string(),
            pool,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| match e {
            // Making a connection failed for a reason the server gave (a wrong password, a
            // database that does not exist): saying so beats "unavailable".
            PoolError::Backend(e) if e.as_db_error().is_some() && !is_unavailable(&e) => {
                self.query_error(&e)
            }
            other => DbError::Unavailable {
                url: self.url.clone(),
                reason: describe_pool_error(other),
            },
        })
    }

    fn query_error(&self, e: &tokio_postgres::Error) -> DbError {
        let reason = describe(e);
        if is_unavailable(e) {
            DbError::Unavailable {
                url: self.url.clone(),
                reason,
            }
        } else {
            DbError::Query {
                url: self.url.clone(),
                reason,
            }
        }
    }

    /// Migrates the database and runs the seed statements.
    pub async fn prepare(
        &self,
        migrations: &'static [Migration],
        seed: &[Statement],
    ) -> Result<Vec<u64>, DbError> {
        let mut client = self.client().await?;
        let error = |e: tokio_postgres::Error| self.query_error(&e);
        let tx = client.transaction().await.map_err(error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(error)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .await
            .map_err(error)?;
        let applied: i64 = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await
            .map_err(error)?
            .map_or(0, |row| row.get(0));
        let known = migrations.len() as i64;
        if applied > known {
            return Err(DbError::NewerSchema {
                url: self.url.clone(),
                found: applied,
                known,
            });
        }
        for (version, migration) in (1..).zip(migrations).skip(applied as usize) {
            tx.batch_execute(migration.postgres).await.map_err(error)?;
            tracing::info!(database = %self.url, version, "applied migration");
        }
        tx.execute("DELETE FROM schema_version", &[])
            .await
            .map_err(error)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&known],
        )
        .await
        .map_err(error)?;
        let changed = run(&tx, seed).await.map_err(error)?;
        tx.commit().await.map_err(error)?;
        Ok(changed)
    }

    pub async fn query(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, DbError> {
        let client = self.client().await?;
        let error = |e: tokio_postgres::Error| self.query_error(&e);
        let statement = client.prepare_cached(sql).await.map_err(error)?;
        let rows = client
            .query(&statement, &refs(&params))
            .await
            .map_err(error)?;
        rows.iter().map(row).collect()
    }

    pub async fn atomically(&self, statements: Vec<Statement>) -> Result<Vec<u64>, DbError> {
        let mut client = self.client().await?;
        let error = |e: tokio_postgres::Error| self.query_error(&e);
        let tx = client.transaction().await.map_err(error)?;
        let changed = run(&tx, &statements).await.map_err(error)?;
        tx.commit().await.map_err(error)?;
        Ok(changed)
    }
}

async fn run(
    tx: &deadpool_postgres::Transaction<'_>,
    statements: &[Statement],
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let mut changed = Vec::with_capacity(statements.len());
    for statement in statements {
        let prepared = tx.prepare_cached(statement.sql).await?;
        changed.push(tx.execute(&prepared, &refs(&statement.params)).await?);
    }
    Ok(changed)
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn row(row: &tokio_postgres::Row) -> Result<Row, DbError> {
    let column = |i: usize, e: tokio_postgres::Error| DbError::Column(format!("column {i}: {e}"));
    let values = row
        .columns()
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let value = match *col.type_() {
                Type::INT2 => row
                    .try_get::<_, Option<i16>>(i)
                    .map(|v| v.map(i64::from).into()),
                Type::INT4 => row
                    .try_get::<_, Option<i32>>(i)
                    .map(|v| v.map(i64::from).into()),
                Type::INT8 => row.try_get::<_, Option<i64>>(i).map(Value::from),
                _ => row.try_get::<_, Option<String>>(i).map(Value::from),
            };
            value.map_err(|e| column(i, e))
        })
        .collect::<Result<_, _>>()?;
    Ok(Row(values))
}

/// Integers go out in the width the column has; text as text.
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Value::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2 | Type::INT4 | Type::INT8 | Type::TEXT | Type::VARCHAR | Type::BPCHAR
        )
    }

    to_sql_checked!();
}

/// The server is unreachable or went away, as opposed to a statement it refused.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exception. 57P01-03: the server is shutting down, crashed, or
        // is still starting up. 53300: too many connections.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
        }
        None => e
            .source()
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}

/// tokio-postgres's own message plus its cause ("error connecting to server: Connection
/// refused (os error 111)").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn describe_pool_error(e: PoolError) -> String {
    match e {
        PoolError::Backend(e) => describe(&e),
        PoolError::Timeout(kind) => format!(
            "no connection within {POOL_TIMEOUT:?} ({kind:?}): the server did not answer in time"
        ),
        other => other.to_string(),
    }
}

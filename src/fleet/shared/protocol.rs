//! The Redis side of the shared state: the keys, one connection (made by
//! the first call, then kept; the connection manager reconnects by itself),
//! every call bounded by [`CALL_TIMEOUT`], and the scripts' replies and the
//! release announcements read into types, so that callers match on what
//! Redis said rather than on its strings.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{FromRedisValue, RedisError, RedisResult, Value};
use tokio::sync::OnceCell;

use crate::fleet::BackendId;

/// The longest any one Redis call may take before Redis counts as gone.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// What every key starts with.
pub(super) const PREFIX: &str = "corral:";
/// Where freed slots are announced.
pub(super) const CHANNEL: &str = "corral:released";
pub(super) const INSTANCES_KEY: &str = "corral:instances";
pub(super) const WAITING_KEY: &str = "corral:waiting";
pub(super) const DRAINED_KEY: &str = "corral:drained";
pub(super) const REGISTERED_KEY: &str = "corral:registered";

/// The sorted set of the leases taken on `id`.
pub(super) fn slots_key(id: &BackendId) -> String {
    format!("{PREFIX}slots:{id}")
}

/// A Redis server, reached on first use.
pub(super) struct Redis {
    client: redis::Client,
    /// A once-cell rather than a lock: callers that find it empty wait for
    /// one connection attempt, and a failed attempt leaves it empty for the
    /// next call.
    conn: OnceCell<ConnectionManager>,
}

impl Redis {
    /// The server at `url`; nothing is connected yet.
    pub(super) fn open(url: &str) -> RedisResult<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: OnceCell::new(),
        })
    }

    async fn connection(&self) -> RedisResult<ConnectionManager> {
        let connect = || {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CALL_TIMEOUT)
                .set_response_timeout(CALL_TIMEOUT)
                .set_number_of_retries(1);
            within(
                CALL_TIMEOUT * 2,
                ConnectionManager::new_with_config(self.client.clone(), config),
            )
        };
        self.conn.get_or_try_init(connect).await.cloned()
    }

    pub(super) async fn run<T: FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let mut conn = self.connection().await?;
        within(CALL_TIMEOUT, invocation.invoke_async(&mut conn)).await
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        let mut conn = self.connection().await?;
        within(CALL_TIMEOUT, cmd.query_async(&mut conn)).await
    }

    /// A subscription to `channel` on a connection of its own.
    pub(super) async fn subscribe(&self, channel: &str) -> Option<PubSub> {
        let connect = self.client.get_async_pubsub();
        let mut pubsub = within(CALL_TIMEOUT * 2, connect).await.ok()?;
        pubsub.subscribe(channel).await.ok()?;
        Some(pubsub)
    }
}

/// `call`, failed as timed out after `limit`.
async fn within<T>(limit: Duration, call: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
}

/// A reply no script of ours gives.
fn unexpected(script: &'static str, what: String) -> RedisError {
    RedisError::from((redis::ErrorKind::TypeError, script, what))
}

/// What `TAKE` answered; each but `Lost` with the backend's holders (the
/// members of its slots set, comma-separated).
#[derive(Debug)]
pub(super) enum Take {
    Taken(String),
    /// The backend is full fleet-wide.
    Full(String),
    /// Redis no longer lists this instance (it restarted empty).
    Lost,
}

impl FromRedisValue for Take {
    fn from_redis_value(v: &Value) -> RedisResult<Self> {
        let (outcome, holders) = <(String, String)>::from_redis_value(v)?;
        match outcome.as_str() {
            "1" => Ok(Self::Taken(holders)),
            "0" => Ok(Self::Full(holders)),
            "lost" => Ok(Self::Lost),
            _ => Err(unexpected("TAKE", outcome)),
        }
    }
}

/// What `TRANSFER` answered; each but `Lost` with the backend's holders.
#[derive(Debug)]
pub(super) enum Transfer {
    /// The lease is the next waiter's, renewed.
    Kept(String),
    /// Given back and announced: an older waiter elsewhere gets the slot.
    Yielded(String),
    /// The lease had expired.
    Gone(String),
    /// Redis no longer lists this instance.
    Lost,
}

impl FromRedisValue for Transfer {
    fn from_redis_value(v: &Value) -> RedisResult<Self> {
        let (outcome, holders) = <(String, String)>::from_redis_value(v)?;
        match outcome.as_str() {
            "1" => Ok(Self::Kept(holders)),
            "0" => Ok(Self::Yielded(holders)),
            "gone" => Ok(Self::Gone(holders)),
            "lost" => Ok(Self::Lost),
            _ => Err(unexpected("TRANSFER", outcome)),
        }
    }
}

/// What `REFRESH` answered.
#[derive(Debug)]
pub(super) struct Refreshed {
    /// Live instances, this one included.
    pub(super) instances: usize,
    /// This instance's leases and drains were written again.
    pub(super) rewritten: bool,
    /// `corral:settling` is set: Redis came back empty less than a TTL ago.
    pub(super) settling: bool,
    /// The holders of each backend asked about, in the order asked.
    pub(super) holders: Vec<String>,
    /// The drained backends, one a line.
    pub(super) drained: String,
}

impl FromRedisValue for Refreshed {
    fn from_redis_value(v: &Value) -> RedisResult<Self> {
        let mut out = Vec::<String>::from_redis_value(v)?;
        if out.len() < 4 {
            return Err(unexpected("REFRESH", format!("{out:?}")));
        }
        let drained = out.pop().unwrap_or_default();
        let holders = out.split_off(3);
        let instances = out[0]
            .parse()
            .map_err(|_| unexpected("REFRESH", out[0].clone()))?;
        Ok(Self {
            instances,
            rewritten: out[1] == "1",
            settling: out[2] == "1",
            holders,
            drained,
        })
    }
}

/// One live registration, as `REGISTERED` lists them.
#[derive(Debug)]
pub(super) struct Registration {
    pub(super) id: BackendId,
    pub(super) url: String,
    /// What is left of its lease (`None`: until deregistered).
    pub(super) lease: Option<Duration>,
}

/// What `REGISTERED` answered: every live registration.
#[derive(Debug)]
pub(super) struct Registrations(pub(super) Vec<Registration>);

impl FromRedisValue for Registrations {
    fn from_redis_value(v: &Value) -> RedisResult<Self> {
        let out = Vec::<String>::from_redis_value(v)?;
        let each = out.chunks_exact(3).map(|entry| Registration {
            id: BackendId::parse(&entry[0]),
            url: entry[1].clone(),
            lease: entry[2].parse::<u64>().ok().map(Duration::from_millis),
        });
        Ok(Self(each.collect()))
    }
}

/// A release announcement on [`CHANNEL`]: `<backend>\n<holders>`, and a
/// third line naming the instance that yielded the slot, if one did.
#[derive(Debug)]
pub(super) struct Released<'a> {
    pub(super) backend: BackendId,
    pub(super) holders: &'a str,
    pub(super) yielder: &'a str,
}

impl<'a> Released<'a> {
    pub(super) fn parse(payload: &'a str) -> Self {
        let (backend, rest) = payload.split_once('\n').unwrap_or((payload, ""));
        let (holders, yielder) = rest.split_once('\n').unwrap_or((rest, ""));
        Self {
            backend: BackendId::parse(backend),
            holders,
            yielder,
        }
    }
}

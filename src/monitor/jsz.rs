//! `/jsz`: durable streams, in nats-server's shape: totals, and with
//! `accounts=1` / `streams=1` / `consumers=1` (each implying the one
//! before) the single account's streams and their consumers; `config=1`
//! adds each stream's configuration.
//!
//! Every number comes from the stream API's own answers (STREAM.INFO and
//! CONSUMER.INFO through [`crate::stream::JetStream::report`], totals
//! through [`crate::stream::JetStream::usage`], which `$JS.API.INFO` uses
//! too), so `/jsz` and the API never disagree. A consumer's `num_pending`
//! may read the store, so this view runs on the blocking pool. Skiff has
//! one account (`$G`, nats-server's global account).

use serde::Serialize;

use super::{rfc3339, Monitor, Query, RequestError};
use crate::stream::api::{ClusterInfo, ConsumerInfo, StreamConfig, StreamStateJson};
use crate::stream::{JetStream, Usage};

/// The global account, as nats-server names it.
const ACCOUNT: &str = "$G";

/// What the query asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Options {
    accounts: bool,
    streams: bool,
    consumers: bool,
    config: bool,
}

impl Options {
    pub(super) fn parse(query: &Query) -> Result<Options, RequestError> {
        let consumers = query.flag("consumers")?;
        let streams = consumers || query.flag("streams")?;
        Ok(Options {
            accounts: streams || query.flag("accounts")?,
            streams,
            consumers,
            config: query.flag("config")?,
        })
    }
}

#[derive(Serialize)]
pub(super) struct Jsz {
    server_id: String,
    now: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disabled: bool,
    /// Skiff's own: what is out of service and why. `"$JS"` when the
    /// whole store could not be opened, else each stream that could not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    offline: Vec<Offline>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<JsConfig>,
    memory: u64,
    storage: u64,
    reserved_memory: u64,
    reserved_storage: u64,
    accounts: usize,
    streams: usize,
    consumers: usize,
    messages: u64,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_details: Option<Vec<AccountDetail>>,
}

#[derive(Serialize)]
pub(super) struct JsConfig {
    /// Store limits (`max_memory_store`, `max_file_store`); -1: none.
    max_memory: i64,
    max_storage: i64,
    store_dir: String,
    /// Background fsync interval in nanoseconds; absent with
    /// `sync = "always"` (fsync before every PubAck).
    #[serde(skip_serializing_if = "Option::is_none")]
    sync_interval: Option<u128>,
    sync_always: bool,
}

#[derive(Serialize)]
struct AccountDetail {
    name: &'static str,
    id: &'static str,
    memory: u64,
    storage: u64,
    streams: usize,
    consumers: usize,
    messages: u64,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_detail: Option<Vec<StreamDetail>>,
}

#[derive(Serialize)]
struct StreamDetail {
    name: String,
    created: String,
    cluster: ClusterInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<StreamConfig>,
    state: StreamStateJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer_detail: Option<Vec<ConsumerInfo>>,
}

#[derive(Serialize)]
pub(super) struct Offline {
    name: String,
    reason: String,
}

pub(super) fn jsz(monitor: &Monitor, options: &Options) -> Jsz {
    let state = &monitor.state;
    let js = state.jetstream.get();
    let offline = match (state.jetstream_offline.get(), js) {
        (Some(reason), _) => vec![("$JS".to_string(), reason.clone())],
        (None, Some(js)) => js.offline_streams(),
        (None, None) => Vec::new(),
    };
    let usage = js.map(|js| js.usage()).unwrap_or_default();
    let config = js.map(|js| js_config(js));
    let account_details = js.filter(|_| options.accounts).map(|js| {
        let stream_detail = options.streams.then(|| {
            js.report(options.consumers)
                .into_iter()
                .map(|s| StreamDetail {
                    name: s.info.config.name.clone(),
                    created: s.info.created,
                    cluster: s.info.cluster,
                    config: options.config.then_some(s.info.config),
                    state: s.info.state,
                    consumer_detail: options.consumers.then_some(s.consumers),
                })
                .collect()
        });
        vec![account(&usage, stream_detail)]
    });
    Jsz {
        server_id: state.info.server_id.clone(),
        now: rfc3339(std::time::SystemTime::now()),
        disabled: js.is_none(),
        offline: offline
            .into_iter()
            .map(|(name, reason)| Offline { name, reason })
            .collect(),
        config,
        memory: usage.memory,
        storage: usage.storage,
        reserved_memory: 0,
        reserved_storage: 0,
        accounts: usize::from(js.is_some()),
        streams: usage.streams,
        consumers: usage.consumers,
        messages: usage.messages,
        bytes: usage.bytes,
        account_details,
    }
}

/// The store's settings, as `/jsz` and `/varz` show them.
pub(super) fn js_config(js: &JetStream) -> JsConfig {
    let (max_memory, max_file) = js.store_limits();
    let limit = |l: u64| if l == 0 { -1 } else { l as i64 };
    let interval = js.sync_interval();
    JsConfig {
        max_memory: limit(max_memory),
        max_storage: limit(max_file),
        store_dir: js.store_dir().display().to_string(),
        sync_interval: interval.map(|d| d.as_nanos()),
        sync_always: interval.is_none(),
    }
}

fn account(usage: &Usage, stream_detail: Option<Vec<StreamDetail>>) -> AccountDetail {
    AccountDetail {
        name: ACCOUNT,
        id: ACCOUNT,
        memory: usage.memory,
        storage: usage.storage,
        streams: usage.streams,
        consumers: usage.consumers,
        messages: usage.messages,
        bytes: usage.bytes,
        stream_detail,
    }
}

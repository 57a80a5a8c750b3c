//! The configuration of a stream and of its consumers, as plain data: the
//! `[[jetstream.streams]]` tables of the config file and the `config` of the
//! JetStream API's requests and replies are the same types.
//!
//! Field names, defaults and serde attributes are nats-server's (client
//! libraries deserialise the API replies into their own types). Durations
//! are nanoseconds on the wire; in the config file they may also be written
//! `"2m"` (a bare number is nanoseconds there too, not seconds as elsewhere
//! in the file). Unknown fields are ignored, as nats-server does, so newer
//! clients work; in a config file [`super::Config::from_toml`] still
//! refuses them.
//!
//! Why here, in `config` (layer 2) and not in `stream` (layer 4): the
//! config file declares streams, and a lower layer never names a higher
//! one. So `config` owns the data, and `stream` imports it (re-exporting it
//! from `stream::api`, beside the rest of the API's JSON). Checking and
//! completing a config stays in `stream` (`normalize` in its stream and
//! consumer modules): it answers with the API's errors and looks at the
//! running stream and its consumers.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Default `duplicate_window` (2 minutes), as nats-server's.
pub const DEFAULT_DUPLICATE_WINDOW: i64 = 120_000_000_000;
/// Default `ack_wait` (30 s).
pub const DEFAULT_ACK_WAIT: i64 = 30_000_000_000;
/// Default `max_ack_pending` for consumers that ack.
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1000;
/// Default `max_waiting` (pull requests queued per consumer).
pub const DEFAULT_MAX_WAITING: i64 = 512;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    #[default]
    Limits,
    Interest,
    #[serde(rename = "workqueue")]
    WorkQueue,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    #[default]
    Old,
    New,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// A stream's configuration (STREAM.CREATE/UPDATE, `[[jetstream.streams]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub subjects: Vec<String>,
    pub retention: Retention,
    pub max_consumers: i64,
    pub max_msgs: i64,
    pub max_bytes: i64,
    #[serde(deserialize_with = "de_nanos")]
    pub max_age: i64,
    pub max_msgs_per_subject: i64,
    pub max_msg_size: i64,
    pub discard: Discard,
    #[serde(skip_serializing_if = "is_false")]
    pub discard_new_per_subject: bool,
    pub storage: Storage,
    pub num_replicas: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub no_ack: bool,
    #[serde(deserialize_with = "de_nanos")]
    pub duplicate_window: i64,
    pub sealed: bool,
    pub deny_delete: bool,
    pub deny_purge: bool,
    pub allow_rollup_hdrs: bool,
    pub allow_direct: bool,
    pub mirror_direct: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
    /// Mirrors and sources are not supported; kept to refuse them clearly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<serde_json::Value>,
    /// Consumers declared with the stream in the config file.
    #[serde(skip_serializing)]
    pub consumers: Vec<ConsumerConfig>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: String::new(),
            description: None,
            subjects: Vec::new(),
            retention: Retention::Limits,
            max_consumers: -1,
            max_msgs: -1,
            max_bytes: -1,
            max_age: 0,
            max_msgs_per_subject: -1,
            max_msg_size: -1,
            discard: Discard::Old,
            discard_new_per_subject: false,
            storage: Storage::File,
            num_replicas: 1,
            no_ack: false,
            duplicate_window: 0,
            sealed: false,
            deny_delete: false,
            deny_purge: false,
            allow_rollup_hdrs: false,
            allow_direct: false,
            mirror_direct: false,
            metadata: None,
            mirror: None,
            sources: None,
            consumers: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    #[default]
    All,
    Last,
    New,
    ByStartSequence,
    ByStartTime,
    LastPerSubject,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    #[default]
    None,
    All,
    Explicit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayPolicy {
    #[default]
    Instant,
    Original,
}

/// A consumer's configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_group: Option<String>,
    pub deliver_policy: DeliverPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_start_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_start_time: Option<String>,
    pub ack_policy: AckPolicy,
    #[serde(deserialize_with = "de_nanos")]
    pub ack_wait: i64,
    pub max_deliver: i64,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de_nanos_list"
    )]
    pub backoff: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_subject: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filter_subjects: Vec<String>,
    pub replay_policy: ReplayPolicy,
    #[serde(skip_serializing_if = "is_zero")]
    pub max_waiting: i64,
    pub max_ack_pending: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub headers_only: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub flow_control: bool,
    #[serde(skip_serializing_if = "is_zero", deserialize_with = "de_nanos")]
    pub idle_heartbeat: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max_batch: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max_bytes: i64,
    #[serde(skip_serializing_if = "is_zero", deserialize_with = "de_nanos")]
    pub max_expires: i64,
    #[serde(skip_serializing_if = "is_zero", deserialize_with = "de_nanos")]
    pub inactive_threshold: i64,
    pub num_replicas: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub mem_storage: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
}

impl ConsumerConfig {
    /// The consumer's name: `durable_name`, else `name`.
    pub fn consumer_name(&self) -> Option<&str> {
        self.durable_name
            .as_deref()
            .or(self.name.as_deref())
            .filter(|n| !n.is_empty())
    }

    /// The subject filters, from `filter_subject` and `filter_subjects`.
    pub fn filters(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .filter_subject
            .iter()
            .filter(|f| !f.is_empty())
            .cloned()
            .collect();
        all.extend(self.filter_subjects.iter().cloned());
        all
    }

    pub fn is_pull(&self) -> bool {
        self.deliver_subject.as_deref().is_none_or(str::is_empty)
    }
}

/// Also `stream::api`'s, for the fields its replies add.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A duration as nanoseconds (JSON) or text like `"2m"` (config files).
#[derive(Deserialize)]
#[serde(untagged)]
enum NanosOrText {
    Nanos(i64),
    Text(String),
}

fn nanos_from(v: NanosOrText) -> Result<i64, String> {
    match v {
        NanosOrText::Nanos(n) => Ok(n),
        NanosOrText::Text(t) => crate::units::parse_duration(&t).map(|d| d.as_nanos() as i64),
    }
}

fn de_nanos<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    nanos_from(NanosOrText::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn de_nanos_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    Vec::<NanosOrText>::deserialize(d)?
        .into_iter()
        .map(|v| nanos_from(v).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_config_defaults_match_nats_server() {
        let c: StreamConfig = serde_json::from_str(r#"{"name":"S","subjects":["a.>"]}"#).unwrap();
        assert_eq!((c.max_msgs, c.max_bytes, c.num_replicas), (-1, -1, 1));
        assert_eq!(c.storage, Storage::File);
        let c: StreamConfig = toml::from_str("name = \"S\"\nmax_age = \"1h\"").unwrap();
        assert_eq!(c.max_age, 3_600_000_000_000);
    }
}

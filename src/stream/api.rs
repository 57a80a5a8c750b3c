//! The JSON of the JetStream API, as nats-server 2.10 speaks it: the info
//! replies, requests, and errors with their codes.
//!
//! Field names, defaults and error codes are nats-server's, because client
//! libraries deserialise these replies into their own types and pick
//! exception types from `err_code`. Times are RFC 3339. Unknown fields are
//! ignored, as nats-server does, so newer clients work.
//!
//! The stream and consumer configs ([`StreamConfig`], [`ConsumerConfig`] and
//! their enums and defaults) are defined in [`crate::config::streams`],
//! because the config file declares streams too and `config` sits below
//! `stream`; they are re-exported here so the whole API vocabulary is at
//! one path.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::streams::is_false;
pub use crate::config::streams::{
    AckPolicy, ConsumerConfig, DeliverPolicy, Discard, ReplayPolicy, Retention, Storage,
    StreamConfig, DEFAULT_ACK_WAIT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_ACK_PENDING,
    DEFAULT_MAX_WAITING,
};

/// STREAM.INFO's `state`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamStateJson {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub first_ts: String,
    pub last_seq: u64,
    pub last_ts: String,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub num_subjects: u64,
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub num_deleted: u64,
    pub consumer_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<HashMap<String, u64>>,
}

/// Leader information, so clients that read `cluster.leader` find one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub leader: String,
}

/// STREAM.INFO (and CREATE/UPDATE) reply body.
#[derive(Clone, Debug, Serialize)]
pub struct StreamInfo {
    pub config: StreamConfig,
    pub created: String,
    pub state: StreamStateJson,
    pub cluster: ClusterInfo,
    pub ts: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct SequenceInfo {
    pub consumer_seq: u64,
    pub stream_seq: u64,
}

/// CONSUMER.INFO (and CREATE) reply body.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumerInfo {
    pub stream_name: String,
    pub name: String,
    pub created: String,
    pub config: ConsumerConfig,
    pub delivered: SequenceInfo,
    pub ack_floor: SequenceInfo,
    pub num_ack_pending: usize,
    pub num_redelivered: usize,
    pub num_waiting: usize,
    pub num_pending: u64,
    pub cluster: ClusterInfo,
    #[serde(skip_serializing_if = "is_false")]
    pub push_bound: bool,
    pub ts: String,
}

/// CONSUMER.CREATE request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateConsumerRequest {
    pub stream_name: String,
    pub config: ConsumerConfig,
    /// `"create"`, `"update"` or empty (create or update).
    pub action: String,
}

/// Paging of NAMES/LIST requests.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListRequest {
    pub offset: usize,
    pub subject: Option<String>,
}

/// STREAM.INFO request options.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInfoRequest {
    pub subjects_filter: Option<String>,
}

/// STREAM.PURGE request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PurgeRequest {
    pub filter: Option<String>,
    pub seq: Option<u64>,
    pub keep: Option<u64>,
}

/// STREAM.MSG.GET and DIRECT.GET requests.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct MsgGetRequest {
    pub seq: Option<u64>,
    pub last_by_subj: Option<String>,
    pub next_by_subj: Option<String>,
}

/// STREAM.MSG.DELETE request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct MsgDeleteRequest {
    pub seq: u64,
    pub no_erase: bool,
}

/// A pull request (CONSUMER.MSG.NEXT).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct NextRequest {
    pub batch: usize,
    pub expires: i64,
    pub no_wait: bool,
    pub max_bytes: usize,
    pub idle_heartbeat: i64,
}

/// The error part of a failed reply: `{"error":{"code","err_code","description"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{description} ({code}/{err_code})")]
pub struct ApiError {
    pub code: u16,
    pub err_code: u32,
    pub description: String,
}

impl ApiError {
    pub fn new(code: u16, err_code: u32, description: impl Into<String>) -> ApiError {
        ApiError {
            code,
            err_code,
            description: description.into(),
        }
    }

    pub fn stream_not_found() -> ApiError {
        ApiError::new(404, 10059, "stream not found")
    }

    pub fn consumer_not_found() -> ApiError {
        ApiError::new(404, 10014, "consumer not found")
    }

    pub fn bad_request() -> ApiError {
        ApiError::new(400, 10003, "bad request")
    }

    pub fn invalid_json(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(400, 10025, format!("invalid JSON: {e}"))
    }

    pub fn stream_name_mismatch() -> ApiError {
        ApiError::new(400, 10056, "stream name in subject does not match request")
    }

    /// CONSUMER.DURABLE.CREATE without exactly one token after the stream.
    pub fn durable_name_not_in_subject() -> ApiError {
        ApiError::new(
            400,
            10016,
            "consumer expected to be durable but no durable name set in subject",
        )
    }

    pub fn durable_name_mismatch() -> ApiError {
        ApiError::new(
            400,
            10017,
            "consumer name in subject does not match durable name in request",
        )
    }

    /// CONSUMER.DURABLE.CREATE without `durable_name` in the body.
    pub fn durable_name_not_set() -> ApiError {
        ApiError::new(
            400,
            10018,
            "consumer expected to be durable but a durable name was not set",
        )
    }

    /// `CONSUMER.CREATE.<stream>` (no name token) with `durable_name` set.
    pub fn ephemeral_with_durable_name() -> ApiError {
        ApiError::new(
            400,
            10020,
            "consumer expected to be ephemeral but a durable name was set in request",
        )
    }

    pub fn stream_in_use() -> ApiError {
        ApiError::new(
            400,
            10058,
            "stream name already in use with a different configuration",
        )
    }

    pub fn stream_name_contains_path_separators() -> ApiError {
        ApiError::new(400, 10128, "Stream name can not contain path separators")
    }

    pub fn consumer_name_contains_path_separators() -> ApiError {
        ApiError::new(400, 10127, "Consumer name can not contain path separators")
    }

    pub fn subjects_overlap() -> ApiError {
        ApiError::new(400, 10065, "subjects overlap with an existing stream")
    }

    /// JSStreamInvalidConfigF, which nats-server answers with code 500.
    pub fn stream_config(description: impl Into<String>) -> ApiError {
        ApiError::new(500, 10052, description)
    }

    pub fn consumer_config(description: impl Into<String>) -> ApiError {
        ApiError::new(400, 10012, description)
    }

    pub fn no_message_found() -> ApiError {
        ApiError::new(404, 10037, "no message found")
    }

    pub fn store_failed(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(503, 10077, e.to_string())
    }

    /// JSStreamGeneralErrorF: nats-server has no code of its own for it.
    /// A server-wide store limit (`max_file_store`, `max_memory_store`) is
    /// reached: nats-server's JSStorageResourcesExceededErr (10047) or
    /// JSMemoryResourcesExceededErr (10028).
    pub fn insufficient_resources(storage: Storage) -> ApiError {
        match storage {
            Storage::File => ApiError::new(500, 10047, "insufficient storage resources available"),
            Storage::Memory => ApiError::new(500, 10028, "insufficient memory resources available"),
        }
    }

    pub fn encoding_failed(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(500, 10051, format!("cannot encode JSON: {e}"))
    }

    /// JSStreamOfflineErr, with why the stream could not be opened.
    pub fn stream_offline(reason: &str) -> ApiError {
        ApiError::new(500, 10118, format!("stream is offline: {reason}"))
    }

    /// JetStream as a whole could not start (its store did not open).
    pub fn jetstream_offline(reason: &str) -> ApiError {
        ApiError::new(
            503,
            10008,
            format!("JetStream system temporarily unavailable: {reason}"),
        )
    }
}

/// A reply: the body's fields flattened beside `type`, or `error`.
#[derive(Serialize)]
pub struct Reply<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(flatten)]
    pub body: T,
}

/// Serialises an API reply, success or error.
pub fn reply_json<T: Serialize>(kind: &str, result: Result<T, ApiError>) -> Vec<u8> {
    #[derive(Serialize)]
    struct ErrorBody {
        error: ApiError,
    }
    let error_reply = |error: ApiError| {
        serde_json::to_vec(&Reply {
            kind,
            body: ErrorBody { error },
        })
    };
    let encoded = match result {
        Ok(body) => serde_json::to_vec(&Reply { kind, body })
            .or_else(|e| error_reply(ApiError::encoding_failed(e))),
        Err(error) => error_reply(error),
    };
    // Every request with a reply subject is answered: should even the error
    // not serialise, a fixed one goes out.
    encoded.unwrap_or_else(|_| {
        br#"{"error":{"code":500,"err_code":10051,"description":"reply could not be encoded"}}"#
            .to_vec()
    })
}

/// A record or reply as JSON; failing to encode is an API error, never an
/// empty record.
pub fn to_json(value: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(ApiError::encoding_failed)
}

/// Whether a stream or consumer name contains `/` or `\`. Names become
/// file names in the store; nats-server refuses these on create with errors
/// of their own (10127, 10128) rather than the generic invalid-config ones.
pub fn has_path_separator(name: &str) -> bool {
    name.contains(['/', '\\'])
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// RFC 3339 text of a Unix-nanos time; the zero time as nats-server writes
/// it for "never".
pub fn rfc3339(nanos: i64) -> String {
    if nanos <= 0 {
        return "0001-01-01T00:00:00Z".to_string();
    }
    let time = UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Parses RFC 3339 text into Unix nanos.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()?;
    time.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_serialise_in_the_client_shape() {
        let json = reply_json::<()>(
            "io.nats.jetstream.api.v1.stream_info_response",
            Err(ApiError::stream_not_found()),
        );
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["error"]["err_code"], 10059);
        assert_eq!(v["error"]["code"], 404);
    }

    #[test]
    fn times_round_trip() {
        let t = 1_700_000_000_123_456_789;
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(rfc3339(0), "0001-01-01T00:00:00Z");
    }
}

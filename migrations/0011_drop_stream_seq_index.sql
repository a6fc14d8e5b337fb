-- events_stream_id_seq_idx (stream_id, stream_seq) orders an entity stream exactly as
-- events_stream_version_idx (stream_id, stream_version) does: versions are handed out in
-- stream_seq order (src/store/write.rs). Reads of one stream use the version index; a replay
-- of one stream, ordered by stream_seq, reads its events by that index and sorts them. One
-- index fewer to write for every event of an entity stream.
DROP INDEX event.events_stream_id_seq_idx;

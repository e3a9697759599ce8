-- Dead letters isolated to the record and accounted for (issue 10, section 1).
--
-- A dead letter now says what it is and, when known, whose seqs it holds:
--   kind 'record'  one record (data = its MessagePack encoding), seq = last_seq
--   kind 'batch'   a whole batch whose envelope was valid (data = the message)
--   kind 'message' bytes with no readable identity (garbage, spoofed subject)
--   kind 'event'   an event from <prefix>.evt.> (heartbeat, status report, ...)
-- The seqs of 'record' and 'batch' dead letters are merged into
-- committed_ranges.dead_lettered, which counts toward the watermark like
-- committed and dropped seqs: a bad record never stalls its stream.

ALTER TABLE dead_letters
    ADD COLUMN kind        text        NOT NULL DEFAULT 'message',
    ADD COLUMN edge_id     text,
    ADD COLUMN stream      text,
    ADD COLUMN epoch       bigint,
    ADD COLUMN seq         bigint,      -- first seq held
    ADD COLUMN last_seq    bigint,      -- last seq held (= seq for a record)
    ADD COLUMN replayed_at timestamptz, -- when an operator's replay committed it
    ADD CONSTRAINT dead_letters_kind CHECK (kind IN ('record', 'batch', 'message', 'event')),
    ADD CONSTRAINT dead_letters_identity CHECK (
        (seq IS NULL) = (kind IN ('message', 'event'))
        AND (seq IS NULL OR (edge_id IS NOT NULL AND stream IS NOT NULL
                             AND epoch IS NOT NULL AND last_seq >= seq)));

-- A redelivered message is dead-lettered once, not once per delivery.
CREATE UNIQUE INDEX dead_letters_identity_idx
    ON dead_letters (edge_id, stream, epoch, seq, last_seq) WHERE seq IS NOT NULL;
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at DESC);

ALTER TABLE committed_ranges
    ADD COLUMN dead_lettered int8multirange NOT NULL DEFAULT '{}';

-- dead_lettered counts toward the watermark of v_stream_progress and v_completeness
-- (views.sql).

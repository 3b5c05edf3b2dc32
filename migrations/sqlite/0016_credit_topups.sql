-- Low balance and auto top-up (issue 20, must-have 4). Times are Unix milliseconds; amounts are
-- exact decimals as text, in the unit's own terms (minor units for a currency).

-- Per tenant and credit unit: when to warn, how much to top up, and whether the alarm is armed.
-- `armed` goes to 0 when the balance crosses below the threshold and back to 1 when it is at or
-- above it again; `crossings` counts the crossings, numbering them.
CREATE TABLE credit_settings (
    tenant_id      TEXT NOT NULL,
    unit           TEXT NOT NULL,             -- a lowercase ISO currency, or a credit unit
    threshold      TEXT NOT NULL,
    top_up_amount  TEXT,                      -- minor units of the currency; NULL: none
    auto_top_up    INTEGER NOT NULL DEFAULT 0,
    armed          INTEGER NOT NULL DEFAULT 1,
    crossings      INTEGER NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, unit)
);

-- One row per crossing, written in the transaction that changed the balance: its primary key
-- makes a crossing happen once, whatever replays it.
CREATE TABLE credit_crossings (
    tenant_id         TEXT NOT NULL,
    unit              TEXT NOT NULL,
    seq               INTEGER NOT NULL,
    threshold         TEXT NOT NULL,
    available_before  TEXT NOT NULL,
    available_after   TEXT NOT NULL,
    event_id          TEXT NOT NULL,
    command_id        TEXT,                   -- the top-up command, with auto top-up on
    created_at        BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, unit, seq)
);

-- Notifications to the product (a signed webhook to notify.url), written in the transaction of
-- what causes them; the deliverer (one replica, under the `notify` lease) sends each until the
-- receiver answers 2xx. event_id is what the receiver dedupes on.
CREATE TABLE notifications (
    event_id         TEXT PRIMARY KEY NOT NULL,
    tenant_id        TEXT NOT NULL,
    type             TEXT NOT NULL,
    payload          TEXT NOT NULL,           -- the JSON body sent
    status           TEXT NOT NULL,           -- pending | delivered | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_error       TEXT,
    last_status      INTEGER,                 -- the receiver's last HTTP status
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);
CREATE INDEX notifications_created ON notifications (created_at, event_id);

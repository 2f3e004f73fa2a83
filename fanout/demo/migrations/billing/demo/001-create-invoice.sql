-- billing builds on people: the environment lists it after people, so bootstrap orders them.
CREATE TABLE invoice (
    id BIGSERIAL PRIMARY KEY,
    person_id BIGINT NOT NULL REFERENCES person (id),
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

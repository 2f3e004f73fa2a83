-- depends: 001-create-person
ALTER TABLE person ADD COLUMN address TEXT;
ALTER TABLE person ADD COLUMN email VARCHAR(320);

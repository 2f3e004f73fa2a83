-- depends: 001-create-invoice
ALTER TABLE invoice ADD COLUMN status VARCHAR(20) NOT NULL DEFAULT 'open';
CREATE INDEX invoice_status_idx ON invoice (status);

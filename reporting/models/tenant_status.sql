-- One row per client of every ERP: its status and why, its last successful extraction, its
-- last error, and the fix (the "Fix: ..." part of the error, else of the status reason).
select
    erp,
    org_number,
    erp_client_id,
    name,
    status,
    status_reason as reason,
    last_extracted_at as last_success,
    last_error,
    last_error_at,
    coalesce(
        nullif(regexp_extract(last_error, '(?s)Fix: (.*)$', 1), ''),
        nullif(regexp_extract(status_reason, '(?s)Fix: (.*)$', 1), '')
    ) as fix
from {{ source('warehouse', 'clients') }}

-- Saldobalanse: every account of every tenant and month, with its NS 4102 class: the first digit
-- of the SAF-T standard account where the source maps one, else of its SAF-T grouping code (a
-- 2-digit StandardAccountID or a næringsspesifikasjon code), else of the account number.
-- `account_class` (asset, liability, equity, income, expense) is the warehouse's (accounts.py).
with classified as (
    select
        b.erp,
        b.org_number,
        c.name as client_name,
        b.period,
        b.account_number,
        a.name as account_name,
        a.account_class,
        a.standard_account,
        a.grouping_category,
        a.grouping_code,
        case
            when regexp_full_match(a.standard_account, '[1-9][0-9]{3}') then 'standard_account'
            when regexp_full_match(a.grouping_code, '[1-9][0-9]([0-9]{2})?') then 'grouping_code'
            when regexp_matches(b.account_number, '^[1-9][0-9]{3}') then 'account_number'
        end as classified_by,
        b.opening,
        b.movement,
        b.closing,
        b.currency
    from {{ source('warehouse', 'balances') }} as b
    left join {{ source('warehouse', 'accounts') }} as a using (erp, org_number, account_number)
    left join {{ source('warehouse', 'current_clients') }} as c using (erp, org_number)
)

select
    erp,
    org_number,
    client_name,
    period,
    account_number,
    account_name,
    account_class,
    cast(left(case classified_by
        when 'standard_account' then standard_account
        when 'grouping_code' then grouping_code
        when 'account_number' then account_number
    end, 1) as integer) as ns4102_class,
    classified_by,
    standard_account,
    grouping_category,
    grouping_code,
    opening,
    movement,
    closing,
    currency
from classified

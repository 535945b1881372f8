-- Resultatregnskap per tenant and month by NS 4102 class (3 income, 4-7 expenses, 8 financial
-- items, tax and allocations), split by account class (class 8 holds income, expense and equity
-- accounts). Debit positive, as the ledger: income is negative. `closing` is the fiscal year to
-- date (result accounts start each fiscal year at zero).
-- depends_on: {{ ref('trial_balance') }}
{{ class_totals('ns4102_class between 3 and 8') }}

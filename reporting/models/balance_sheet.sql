-- Balanse per tenant and month by NS 4102 class (1 assets, 2 equity and liabilities), split by
-- account class (class 2: equity, liability), at the month's end (`closing`). Debit positive:
-- equity and liabilities are negative. Until the year-end transfer, the total is minus the
-- year's result to date.
-- depends_on: {{ ref('trial_balance') }}
{{ class_totals('ns4102_class in (1, 2)') }}

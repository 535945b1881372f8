{# Sums of the trial balance per tenant, month, NS 4102 class and account class, for the classes
   `classes` selects (a SQL condition on ns4102_class): the body of both statements. #}
{% macro class_totals(classes) %}
select
    erp,
    org_number,
    any_value(client_name) as client_name,
    period,
    ns4102_class,
    {{ ns4102_class_name('ns4102_class') }} as class_name,
    account_class,
    count(*) as accounts,
    cast(sum(opening) as decimal(18, 2)) as opening,
    cast(sum(movement) as decimal(18, 2)) as movement,
    cast(sum(closing) as decimal(18, 2)) as closing
from {{ ref('trial_balance') }}
where {{ classes }}
group by erp, org_number, period, ns4102_class, account_class
{% endmacro %}

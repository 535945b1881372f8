{# The NS 4102 name of an account class (1-8). #}
{% macro ns4102_class_name(class) -%}
case {{ class }}
    when 1 then 'Eiendeler'
    when 2 then 'Egenkapital og gjeld'
    when 3 then 'Salgs- og driftsinntekt'
    when 4 then 'Varekostnad'
    when 5 then 'Lønnskostnad'
    when 6 then 'Annen driftskostnad'
    when 7 then 'Annen driftskostnad'
    when 8 then 'Finansinntekt og finanskostnad'
end
{%- endmacro %}
